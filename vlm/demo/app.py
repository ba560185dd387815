"""The web demo's page: ``build_app(model) -> gr.Blocks``, and ``launch`` with the settings that keep it offline.

One page: a chatbot (the conversation, each reply with boxes followed by the image they are drawn on), an input box
that takes text and images (upload, drop or paste), the latest drawing beside it, sampling controls (temperature
``0`` = greedy, ``top_p``, max new tokens) and a clear button. Replies stream as they are generated
(``vlm.inference.chat_stream``: the same prompt, generation and decoding as ``model.chat``, so a streamed reply
equals ``model.chat``'s). The conversation is ``model.chat``'s history, kept per browser session in a ``gr.State``;
the chatbot is rendered from it (:mod:`vlm.demo.turns`).

Offline: the page needs nothing but this server. :data:`OFFLINE_ENV` turns Gradio's telemetry and version check off
and keeps server-side rendering (a Node process) off; :func:`build_app` uses ``analytics_enabled=False`` and a theme
whose fonts Gradio serves itself (``LocalFont``; no Google Fonts stylesheet); :func:`launch` never opens a share
tunnel unless asked, binds ``127.0.0.1`` by default and turns off the API page and PWA manifest extras.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlm.demo.turns import (DRAWN_ALT, chatbot_messages, drawings, image_folders, input_turn, save_drawing,
                             shown_text)

#: Environment the demo sets before Gradio is imported (``setdefault``: a user's own setting wins).
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False",  # no telemetry, no PyPI version check at start
               "GRADIO_SSR_MODE": "False",  # no Node server-side rendering
               "HF_HUB_OFFLINE": "1"}

#: Images in the conversation at a readable size (a model's 48-px question image too), upscaled without blur so a
#: drawn box stays sharp.
CSS = """
#chatbot .image-frame img { height: 150px; width: auto; max-width: 100%; object-fit: contain;
                            image-rendering: pixelated; }
#boxes img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""

Message = dict[str, Any]


def set_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def sampling_options(temperature: float | None, top_p: float | None, max_new_tokens: int | float | None
                     ) -> dict[str, Any]:
    """The ``model.chat`` generation options of the page's controls: ``temperature`` ``0`` (or ``None``) is greedy
    decoding (``top_p`` then unused), above ``0`` sampling with ``temperature`` and ``top_p``."""
    opts: dict[str, Any] = {"max_new_tokens": int(max_new_tokens or 128)}
    if temperature is not None and float(temperature) > 0:
        opts["temperature"] = float(temperature)
        opts["top_p"] = float(top_p if top_p is not None else 1.0)
    return opts


class Demo:
    """What the page's events run: ``respond`` (one turn, streamed) and ``render`` (conversation -> chatbot)."""

    def __init__(self, model: Any, processor: Any = None, *, template: Any = None, stop: Sequence[str] = (),
                 draw_dir: str | os.PathLike | None = None) -> None:
        from vlm.eval.evaluator import model_frame
        from vlm.inference.chat import processor_for

        self.model, self.stop = model, list(stop)
        self.processor = processor or processor_for(model, template)
        self.frame = model_frame(self.processor)
        # drawings go under the system temp dir, which Gradio serves without extra allowed paths
        self.draw_dir = Path(draw_dir or tempfile.mkdtemp(prefix="vlm_demo_boxes_"))

    def render(self, history: Sequence[Message]) -> tuple[list[Message], str | None]:
        """``(chatbot messages, path of the latest drawing or None)`` of a conversation."""
        drawn = {d.index: save_drawing(d, self.draw_dir) for d in drawings(history, json_frame=self.frame)}
        latest = drawn[max(drawn)] if drawn else None
        return chatbot_messages(history, drawn), latest

    def respond(self, value: Any, history: list[Message] | None, temperature: float | None = None,
                top_p: float | None = None, max_new_tokens: int | None = None
                ) -> Iterator[tuple[list[Message], list[Message], Any, str | None]]:
        """One turn: yields ``(chatbot, conversation, input box value, latest drawing)`` as the reply grows, last the
        finished turn (the input box cleared). Bad input (no question, an image that cannot be opened, a prompt
        longer than the context) raises ``gr.Error`` with the reason; the conversation is unchanged."""
        import gradio as gr

        from vlm.data.errors import DataError
        from vlm.inference.chat import chat_stream

        history = list(history or [])
        shown, latest = self.render(history)
        try:
            images, text = input_turn(value)
            stream = chat_stream(self.model, images or None, text, history, processor=self.processor,
                                 stop=self.stop, **sampling_options(temperature, top_p, max_new_tokens))
        except (DataError, ValueError) as e:
            raise gr.Error(str(e)) from e
        pending = chatbot_messages(stream.messages[len(history):])
        reply = ""
        yield [*shown, *pending, _assistant("")], history, value, latest
        for piece in stream:
            reply += piece
            yield [*shown, *pending, _assistant(reply)], history, value, latest
        history = stream.history
        if not stream.reply.strip():
            gr.Warning("the reply is empty (the model ended its turn at once, as an untrained model often does); a "
                       "temperature above 0 shows what it would say")
        shown, latest = self.render(history)
        yield shown, history, {"text": "", "files": []}, latest

    def clear(self) -> tuple[list[Message], list[Message], Any, None]:
        return [], [], {"text": "", "files": []}, None


def _assistant(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": shown_text(text)}]}


def build_app(model: Any, *, processor: Any = None, template: Any = None, history: Sequence[Message] | None = None,
              temperature: float = 0.0, top_p: float = 1.0, max_new_tokens: int = 128, stop: Sequence[str] = (),
              title: str = "vlm demo") -> Any:
    """The demo page for ``model`` (a ``VLM`` in eval mode) as a ``gr.Blocks`` (call :func:`launch`).

    ``history``: a conversation to start from (``model.chat``'s history, e.g. ``vlm.inference.load_history``: image
    parts as file paths); ``temperature`` / ``top_p`` / ``max_new_tokens``: the controls' initial values
    (temperature ``0``: greedy); ``stop``: stop strings of every reply. ``app.demo`` is the :class:`Demo` the events
    run."""
    set_offline_env()
    import gradio as gr

    demo = Demo(model, processor, template=template, stop=stop)
    start = list(history or [])
    shown, latest = demo.render(start)
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"### {title}\nAsk about images (upload, drop or paste them into the box). Boxes in a reply "
                    f"are drawn on the image it is about.")
        conversation = gr.State(start)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(shown, label="conversation", elem_id="chatbot", height=620,
                                     render_markdown=False, feedback_options=None, buttons=["copy"])
                box = gr.MultimodalTextbox(placeholder="Ask about the image (drop or paste images here)",
                                           file_types=["image"], file_count="multiple", sources=["upload"],
                                           show_label=False, elem_id="question", submit_btn=True)
                clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=2):
                boxes = gr.Image(latest, type="filepath", label=f"latest reply: {DRAWN_ALT} its image",
                                 interactive=False, elem_id="boxes", height=300,
                                 buttons=["download", "fullscreen"])
                with gr.Accordion("sampling", open=True):
                    temp = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="temperature (0: greedy)",
                                     elem_id="temperature")
                    top = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="top_p", elem_id="top_p")
                    new = gr.Slider(1, 2048, value=max_new_tokens, step=1, label="max new tokens",
                                    elem_id="max_new_tokens")
        outputs = [chatbot, conversation, box, boxes]
        box.submit(demo.respond, [box, conversation, temp, top, new], outputs)
        clear.click(demo.clear, None, outputs)
        chatbot.clear(demo.clear, None, outputs)  # the chatbot's own trash icon forgets the conversation too
    app.demo = demo
    app.allowed = image_folders(start)
    return app


def launch(app: Any, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           block: bool = True, **options: Any) -> Any:
    """Serve ``app`` (from :func:`build_app`) on ``host:port`` with the offline settings; ``block=False`` returns
    once the server runs (``app.close()`` stops it). ``options``: more ``gr.Blocks.launch`` keywords."""
    set_offline_env()
    import gradio as gr

    kwargs = {"server_name": host, "server_port": port, "share": share, "prevent_thread_lock": not block,
              "ssr_mode": False, "show_error": True, "quiet": not block, "inbrowser": False,
              "theme": gr.themes.Default(), "css": CSS, "allowed_paths": list(getattr(app, "allowed", [])), **options}
    return app.launch(**kwargs)
