"""A model's own chat template (Jinja), rendered the way Hugging Face `transformers` renders it.

An imported instruct model (SmolLM2, Llama 3, Qwen2, Gemma, ...) was trained on its own conversation format,
published with its tokenizer as a Jinja template: `chat_template` in tokenizer_config.json, a
`chat_template.jinja` file beside it, or `tokenizer.chat_template` in a GGUF file. To talk to the model as it
was trained, byollm renders that template exactly as `transformers.PreTrainedTokenizerBase.apply_chat_template`
does, so the same conversation gives the same text (the tests compare the two). The facts that make the text
the same (transformers' `utils/chat_template_utils.py`):

- a *sandboxed* environment (`ImmutableSandboxedEnvironment`): templates come from model files, i.e. from
  strangers, so a template may not reach Python internals or mutate the messages it is given;
- `trim_blocks=True, lstrip_blocks=True`: the newline after a `{% ... %}` tag and the spaces before it are
  dropped, so templates can be written over several lines without those lines reaching the text;
- the `loopcontrols` extension (`{% break %}`, `{% continue %}`);
- globals `raise_exception(message)` (a template refusing a conversation, e.g. "roles must alternate"),
  `strftime_now(format)` (today's date, which Llama 3.1 templates print), and a `namespace` that refuses
  underscore-prefixed names; `dict` callable but not a class a template can climb through;
- the `tojson` filter as json.dumps (Jinja's own escapes HTML characters, which would change the text);
- `{% generation %}...{% endgeneration %}` (transformers' marker of the assistant's tokens, used for
  `return_assistant_tokens_mask`): here a no-op, the body is rendered as it stands;
- the variables `messages`, `add_generation_prompt`, `tools` and `documents` (None here: byollm sends no
  tools) and the tokenizer's named special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`, ...).

Any failure while compiling or rendering (a `raise_exception`, a syntax error, a sandbox violation, a type
error in the template) is a `TokenizerError` with one line saying what the template said.

jinja2 is imported only when a template is compiled (it is a core dependency: `transformers` needs it too).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from byollm.errors import TokenizerError

# The named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> Any:
    """The compiled `jinja2.Template` of `source` in transformers' environment (cached: one compile per template)."""
    if not isinstance(source, str) or not source.strip():
        raise TokenizerError("the chat template is empty; give the tokenizer a Jinja chat_template")
    import jinja2
    import jinja2.ext
    import jinja2.sandbox
    import jinja2.utils

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}body{% endgeneration %}` renders `body`: the marker changes no text."""

        tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API is a class attribute

        def parse(self, parser: Any) -> list[Any]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class SafeNamespace(jinja2.utils.Namespace):
        """`namespace(...)` without underscore names, which could reach the object's internals."""

        def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja2's own signature trick
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                SafeNamespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    class DictFunction:
        """`dict(...)` and `dict.fromkeys(...)` for templates, without exposing the class itself."""

        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:  # noqa: A002 - the name templates call it with
        return datetime.now().strftime(format)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=DictFunction(),
                       namespace=SafeNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"the chat template is not valid Jinja: {_one_line(e)}") from None


def render_chat_template(source: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                         variables: Mapping[str, Any] | None = None) -> str:
    """The text of `messages` in the chat template `source`, as transformers' apply_chat_template(tokenize=False).

    add_generation_prompt: end with the assistant's header, asking the model for the next reply.
    variables: the tokenizer's named special tokens (TOKEN_VARIABLES) and anything else the template reads.
    """
    template = compile_chat_template(source)
    # Plain copies: the template sees JSON-like data only, never the caller's objects.
    plain = [{str(k): v for k, v in m.items()} for m in messages]
    try:
        return template.render(messages=plain, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **dict(variables or {}))
    except Exception as e:  # a template is someone else's code: whatever it raises, the conversation is refused
        raise TokenizerError(f"the chat template refused this conversation: {_one_line(e)}") from None


__all__ = ["TOKEN_VARIABLES", "compile_chat_template", "render_chat_template"]
