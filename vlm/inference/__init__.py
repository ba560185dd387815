"""Inference: chat with history (:mod:`.chat`), batched and streamed generation (:mod:`.generate`), boxes drawn
from replies (:mod:`.draw`)."""
from vlm.inference.chat import chat, chat_batch, chat_stream, processor_for
from vlm.inference.generate import Reply, generate_replies, stream_reply

__all__ = ["Reply", "chat", "chat_batch", "chat_stream", "generate_replies", "processor_for", "stream_reply"]
