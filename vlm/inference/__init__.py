"""Inference: chat with history (:mod:`.chat`), batched and streamed generation (:mod:`.generate`), boxes drawn
from replies (:mod:`.draw`), histories saved with their images (:mod:`.history`)."""
from vlm.inference.chat import chat, chat_batch, chat_stream, processor_for
from vlm.inference.generate import Reply, generate_replies, stream_reply
from vlm.inference.history import load_history, save_history

__all__ = ["Reply", "chat", "chat_batch", "chat_stream", "generate_replies", "load_history", "processor_for",
           "save_history", "stream_reply"]
