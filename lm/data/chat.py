"""Chat templates of Hugging Face tokenizers, rendered as transformers' `apply_chat_template` does.

A chat model's tokenizer directory holds its template (`chat_template.jinja`, written by
transformers 5, or the `chat_template` key of tokenizer_config.json, transformers 4) and its
end-of-turn tokens (`eos_token` of tokenizer_config.json, `eos_token_id` of generation_config.json,
often a list: Llama 3 stops at <|eot_id|> and <|end_of_text|>). The template is jinja2, rendered in
a sandbox with transformers' settings: trim_blocks, lstrip_blocks, the loopcontrols extension,
`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and the special tokens
(bos_token, eos_token, ...) as variables. The rendered text is encoded without adding special
tokens (they are in the text), as transformers does.

Not reproduced: tools, documents and transformers 5's `sanitize_control_tokens` (special-token
strings typed inside a message are parsed as those tokens here).
"""

import dataclasses
import datetime
import json
import pathlib
from typing import Any, Sequence

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _read_json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(token) -> str | None:
  return token.get("content") if isinstance(token, dict) else token


def _environment():
  """The jinja2 sandbox transformers renders chat templates in."""
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    from jinja2 import ext, nodes, sandbox  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("--chat needs the jinja2 package (pip install jinja2).") from e

  class Generation(ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for masks; rendering keeps it."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
      return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[Generation, ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """A tokenizer directory's chat template, special tokens and end-of-turn token ids."""
  template: str
  special_tokens: dict[str, str]   # bos_token, eos_token, ... as strings (template variables)
  stop_ids: tuple[int, ...]        # generation stops at any of these

  @classmethod
  def from_directory(cls, directory: str | pathlib.Path, tokenizer) -> "ChatFormat":
    """Reads the chat format of the tokenizer files in `directory`; `tokenizer` (a HuggingFaceTokenizer
    of that directory) maps the end-of-turn tokens to ids. Raises ValueError when there is no template."""
    directory = pathlib.Path(directory)
    config = {**_read_json(directory / "special_tokens_map.json"), **_read_json(directory / "tokenizer_config.json")}
    template = None
    if (directory / "chat_template.jinja").is_file():
      template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    else:
      template = config.get("chat_template") or _read_json(directory / "chat_template.json").get("chat_template")
      if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if not template:
      raise ValueError(f"{directory} has no chat template (chat_template.jinja, or chat_template in "
                       "tokenizer_config.json): --chat needs an instruction-tuned model's tokenizer; "
                       "drop --chat to continue plain text.")
    specials = {k: _content(config[k]) for k in _SPECIAL_KEYS if _content(config.get(k)) is not None}
    stops = [tokenizer.eos_id]
    eos = _read_json(directory / "generation_config.json").get("eos_token_id")
    stops += [eos] if isinstance(eos, int) else list(eos or [])
    return cls(template, specials, tuple(dict.fromkeys(int(i) for i in stops)))

  def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The template applied to `messages` ([{"role": ..., "content": ...}, ...]), as text."""
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    return _environment().from_string(self.template).render(
        messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
        **self.special_tokens)

  def encode(self, tokenizer, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation (no special tokens added: they are in the text)."""
    return tokenizer.encode(self.render(messages, add_generation_prompt))


def chat_format(kind: str, path: str, tokenizer) -> ChatFormat:
  """The ChatFormat of a run's tokenizer (data.tokenizer `kind`, data.tokenizer_path `path`, loaded as
  `tokenizer`); ValueError naming the setting when it is not a Hugging Face tokenizer with a template."""
  if kind != "huggingface":
    raise ValueError(f"--chat needs a Hugging Face tokenizer with a chat template; this checkpoint uses "
                     f"data.tokenizer={kind!r}. Convert an instruction-tuned model with launch.convert "
                     "--from-hf, or drop --chat.")
  path = pathlib.Path(path)
  return ChatFormat.from_directory(path if path.is_dir() else path.parent, tokenizer)
