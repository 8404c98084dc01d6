"""Instruction and chat records as (prompt, response) token documents for supervised fine-tuning.

A record becomes one document, `tokens(prompt + response) + [eos]`, and the number of its leading tokens that
belong to the prompt; the prompt's positions then carry no target (data/sampling.py). Records that cannot be
trained on are dropped and counted by reason, and each file gets one sentence saying how many and why.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from megatron_mixln.config import DataConfig
from megatron_mixln.data.errors import DataError
from megatron_mixln.data.tokenizers import Tokenizer

# Alpaca's standard prompt (Stanford Alpaca, tloen/alpaca-lora templates/alpaca.json), which the Commonsense170K
# fine-tuning code of LLM-Adapters (finetune.py, generate_prompt) uses: one with an input, one without.
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
# The built-in chat template: each message as a "### Role:" block, the prompt ending with the assistant's header.
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_TURN = "### {role}:\n{content}\n\n"
CHAT_RESPONSE_HEADER = "### Assistant:\n"


@dataclass
class DropCounts:
    """Records read from one source file (or hub shard) and the reasons some of them were not kept."""

    where: str
    records: int = 0
    reasons: Counter = field(default_factory=Counter)
    missing: Counter = field(default_factory=Counter)  # field name -> records without it
    merged_boundaries: int = 0  # kept records whose prompt and response tokenise into a shared token

    @property
    def dropped(self) -> int:
        return sum(self.reasons.values()) + sum(self.missing.values())

    def merge(self, other: "DropCounts") -> None:
        self.records += other.records
        self.reasons.update(other.reasons)
        self.missing.update(other.missing)
        self.merged_boundaries += other.merged_boundaries

    def sentence(self, data_cfg: DataConfig) -> str | None:
        """'dropped 3 of 120 records of FILE: 2 have an empty `output`, 1 prompt is longer than ...', or None."""
        if not self.dropped:
            return None
        parts = [f"{count} {'has' if count == 1 else 'have'} no `{name}` field"
                 for name, count in sorted(self.missing.items())]
        phrases = {
            "empty": lambda n: (f"{n} {'has' if n == 1 else 'have'} an empty "
                                + (f"`{data_cfg.output_field}`" if data_cfg.format == "instruction"
                                   else "last assistant message")),
            "not_text": lambda n: f"{n} {'holds' if n == 1 else 'hold'} a non-string value in a prompt or response "
                                  "field",
            "messages": lambda n: (f"{n} {'has' if n == 1 else 'have'} a `{data_cfg.messages_field}` that is not a "
                                   "list of {role, content} messages with roles " + ", ".join(CHAT_ROLES)),
            "no_assistant": lambda n: f"{n} {'has' if n == 1 else 'have'} no assistant message",
            "too_long": lambda n: (f"{n} {'prompt fills' if n == 1 else 'prompts fill'} data.seq_len="
                                   f"{data_cfg.seq_len} tokens, leaving no response token"),
        }
        parts += [phrases[reason](count) for reason, count in sorted(self.reasons.items())]
        return f"dropped {self.dropped} of {self.records} records of {self.where}: {', '.join(parts)}."

    def to_dict(self) -> dict:
        return {"where": self.where, "records": self.records, "dropped": self.dropped,
                "reasons": dict(self.reasons), "missing_fields": dict(self.missing),
                "merged_boundaries": self.merged_boundaries}


def render_example(record: dict, data_cfg: DataConfig) -> tuple[str, str] | tuple[str, None]:
    """(prompt, response) of one record, or ("reason", None) / ("missing:<field>", None) when it cannot be used."""
    if not isinstance(record, dict):
        return "messages" if data_cfg.format == "chat" else "not_text", None
    if data_cfg.format == "chat":
        return _render_chat(record, data_cfg)
    for name in (data_cfg.instruction_field, data_cfg.output_field):
        if record.get(name) is None:
            return f"missing:{name}", None
    instruction, output = record[data_cfg.instruction_field], record[data_cfg.output_field]
    extra = record.get(data_cfg.input_field) or ""
    if not all(isinstance(value, str) for value in (instruction, output, extra)):
        return "not_text", None
    if not output.strip():
        return "empty", None
    if data_cfg.prompt_template == "alpaca":
        template = ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT
    else:
        template = data_cfg.prompt_template
    return template.format(instruction=instruction, input=extra), output


def _render_chat(record: dict, data_cfg: DataConfig) -> tuple[str, str | None]:
    messages = record.get(data_cfg.messages_field)
    if messages is None:
        return f"missing:{data_cfg.messages_field}", None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)
            for m in messages):
        return "messages", None
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return "no_assistant", None
    response = messages[last]["content"]
    if not response.strip():
        return "empty", None
    # Only the last assistant message is trained on; earlier turns (assistant ones included) are its context.
    prompt = "".join(CHAT_TURN.format(role=CHAT_ROLES[m["role"]], content=m["content"]) for m in messages[:last])
    return prompt + CHAT_RESPONSE_HEADER, response


def prompt_token_count(prompt_ids: list[int], full_ids: list[int]) -> tuple[int, bool]:
    """How many leading tokens of tokens(prompt + response) the loss mask covers, and whether the tokenizer merged
    across the boundary.

    Normally tokens(prompt) is a prefix of tokens(prompt + response) and the mask covers exactly those tokens.
    A tokenizer may instead merge the prompt's last characters and the response's first into one token (or
    re-segment a few tokens before the boundary); the mask then covers the longest common prefix only, so the
    merged token, which holds response text, stays a target: no response character goes untrained, and at most
    that one token's prompt characters are learned too.
    """
    common = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        common += 1
    return common, common < len(prompt_ids)


class ExampleEncoder:
    """Records of one shard -> token documents and prompt lengths, counting what it drops."""

    def __init__(self, data_cfg: DataConfig, tokenizer: Tokenizer, where: str):
        self.data_cfg, self.tokenizer = data_cfg, tokenizer
        self.counts = DropCounts(where)
        self._fields_seen: set[str] = set()

    def encode_batch(self, records: list) -> tuple[list[list[int]], list[int]]:
        """(documents, prompt lengths) of the usable records in `records`, in order; eos ends each document."""
        rendered = []
        for record in records:
            self.counts.records += 1
            if isinstance(record, dict):
                self._fields_seen.update(record)
            prompt, response = render_example(record, self.data_cfg)
            if response is None:
                if prompt.startswith("missing:"):
                    self.counts.missing[prompt.removeprefix("missing:")] += 1
                else:
                    self.counts.reasons[prompt] += 1
                continue
            rendered.append((prompt, response))
        if not rendered:
            return [], []
        prompts = self.tokenizer.encode_batch([prompt for prompt, _ in rendered])
        fulls = self.tokenizer.encode_batch([prompt + response for prompt, response in rendered])
        documents, prompt_lengths = [], []
        for prompt_ids, full_ids in zip(prompts, fulls):
            count, merged = prompt_token_count(prompt_ids, full_ids)
            # A document needs a response target inside its first seq_len tokens: a prompt of at most seq_len - 1
            # tokens. Checked on the prompt as tokenised alone too, the stricter of the two counts.
            if count >= len(full_ids):  # the response tokenised to nothing of its own
                self.counts.reasons["empty"] += 1
                continue
            if max(count, len(prompt_ids)) >= self.data_cfg.seq_len:
                self.counts.reasons["too_long"] += 1
                continue
            self.counts.merged_boundaries += merged
            documents.append(list(full_ids) + [self.tokenizer.eos_id])
            prompt_lengths.append(count)
        return documents, prompt_lengths

    def check_schema(self) -> None:
        """Refuse, in one sentence, a shard whose records are all missing a field the format needs."""
        if self.counts.records and max(self.counts.missing.values(), default=0) == self.counts.records:
            needed = ([self.data_cfg.messages_field] if self.data_cfg.format == "chat"
                      else [self.data_cfg.instruction_field, self.data_cfg.output_field])
            fields = ", ".join(f"`{name}`" for name in sorted(self._fields_seen)) or "none"
            setting = ("data.messages_field" if self.data_cfg.format == "chat"
                       else "data.instruction_field / data.input_field / data.output_field")
            raise DataError(f"{self.counts.where} does not hold data.format={self.data_cfg.format} records: none of "
                            f"its {self.counts.records} records has " + " and ".join(f"`{n}`" for n in needed)
                            + f" (its fields are {fields}); set {setting} to its field names, or "
                            "data.format=text for plain documents.")


def example_texts(records: Iterable, data_cfg: DataConfig) -> Iterable[str]:
    """prompt + response of each usable record: what a trained BPE learns its merges from."""
    for record in records:
        prompt, response = render_example(record, data_cfg)
        if response is not None:
            yield prompt + response
