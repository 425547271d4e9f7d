"""Prompt templates: one Jinja file renders the user turn of every item.

The template is rendered in a sandboxed Jinja environment with ``StrictUndefined`` (a typo
in a variable name is an error naming the template and item, not an empty string). These
variables are available:

=============  ================================================================
``item``       the :class:`~kit.evalset.EvalItem` (``item.task``, ``item.slices`` ...)
``task``       the item's task name
``input``      the input text (``input`` or the last user turn of ``messages``)
``context``    the item's ``context`` text or ``None``
``choices``    multiple choice: list of ``{"letter": "A", "text": ...}``; else ``[]``
``labels``     classification: the candidate labels; else ``[]``
``fields``     extraction: the field names to extract; else ``[]``
``tools``      tool_call: the tool specs (list of dicts); else ``[]``
=============  ================================================================

With ``chat: true`` the rendered text becomes the last user turn (earlier turns of a
``messages`` item are kept, a ``system`` message is prepended) and each runtime applies the
model's own chat template. With ``chat: false`` the text is sent as is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import jinja2
from jinja2.sandbox import SandboxedEnvironment

from kit.errors import CompkitError
from kit.evalset import EvalItem, EvalSet, label_set
from kit.runtimes.base import Prompt

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def template_sha256(source: str) -> str:
    """Hash of a template's text (the frozen identity of the prompt)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


@dataclass
class PromptBuilder:
    """Renders items into :class:`Prompt` objects and choice continuations."""

    template_path: Path
    eval_set: EvalSet
    chat: bool = True
    system: str | None = None
    choice_labels: str = "letters"

    def __post_init__(self) -> None:
        try:
            self.source = self.template_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CompkitError(f"prompt template {self.template_path}: {exc.strerror}") from exc
        env = SandboxedEnvironment(
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
            autoescape=False,
        )
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise CompkitError(
                f"prompt template {self.template_path}, line {exc.lineno}: {exc.message}"
            ) from exc

    @property
    def sha256(self) -> str:
        return template_sha256(self.source)

    def render_text(self, item: EvalItem) -> str:
        variables = {
            "item": item,
            "task": item.task,
            "input": item.text,
            "context": item.context,
            "choices": [
                {"letter": LETTERS[i], "text": c} for i, c in enumerate(item.choices or [])
            ],
            "labels": label_set(self.eval_set, item) if item.task == "classification" else [],
            "fields": list(item.fields or {}) if item.task == "extraction" else [],
            "tools": list(item.tools or []),
        }
        try:
            return self._template.render(**variables).strip()
        except jinja2.TemplateError as exc:
            raise CompkitError(
                f"prompt template {self.template_path}, item {item.id!r}: {exc}"
            ) from exc

    def render(self, item: EvalItem) -> Prompt:
        text = self.render_text(item)
        if not self.chat:
            preamble = f"{self.system}\n\n" if self.system else ""
            return Prompt(text=preamble + text)
        turns: list[dict[str, str]] = []
        if self.system:
            turns.append({"role": "system", "content": self.system})
        if item.messages:
            turns.extend(m.model_dump() for m in item.messages[:-1])
        turns.append({"role": "user", "content": text})
        return Prompt(messages=tuple(turns))

    def continuations(self, item: EvalItem) -> tuple[str, ...] | None:
        """What is scored by logprob for the item, or ``None`` for generative tasks.

        Classification scores each candidate label; multiple choice scores the option
        letters (``choice_labels: letters``) or the option texts. Without chat a leading
        space joins the continuation to the prompt, as in lm-evaluation-harness.
        """
        if item.task == "classification":
            options = label_set(self.eval_set, item)
        elif item.task == "multiple_choice":
            assert item.choices is not None
            options = (
                list(LETTERS[: len(item.choices)])
                if self.choice_labels == "letters"
                else list(item.choices)
            )
        else:
            return None
        sep = "" if self.chat else " "
        return tuple(sep + o for o in options)
