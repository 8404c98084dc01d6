"""Our model as an lm-evaluation-harness LM ("mixln"): lm-eval builds the requests and the metrics, this file only
tokenises them as lm-eval's `hf` backend would on the run's --hf export, batches them and scores them.

Scoring is a callable `score_batch(input_ids, labels) -> (logprob_sum float64[B], greedy bool[B])` in the training
convention (labels already shifted, IGNORE_INDEX where there is no target), so the same LM runs over one process's
model (`model_scorer`) or over a sharded training engine whose scorer does the collectives; the LM itself has no
rank logic, and every rank may run it identically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm import tqdm

from megatron_mixln.data.errors import DataError
from megatron_mixln.data.sampling import IGNORE_INDEX
from megatron_mixln.data.tokenizers import Tokenizer

Scorer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Text whose encoding with and without special tokens shows which ids a tokenizer adds around a text by default.
SPECIAL_TOKENS_PROBE = "Mix-LN puts Post-LN first."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


# ------------------------------------------------------------------------------------------------
# Tokenisation: the run's tokenizer, with the special tokens transformers' tokenizer of the export adds
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HarnessTokenizer:
    """The run's tokenizer as lm-eval's `hf` backend uses the export's: `encode(text)` with the ids the export's
    transformers tokenizer adds by default (`add_special_tokens=True`; none for a trained BPE, LLaMA's <s> in
    front, T5's </s> behind), loglikelihood's empty-context prefix is its bos token, else its eos token."""

    tokenizer: Tokenizer
    added_before: tuple[int, ...] = ()
    added_after: tuple[int, ...] = ()
    bos_id: int | None = None
    hf_eos_id: int | None = None  # the export's tokenizer's eos, where it names one

    @property
    def eos_id(self) -> int:
        return self.hf_eos_id if self.hf_eos_id is not None else self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.bos_id if self.bos_id is not None else self.eos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.tokenizer.encode(text)
        return [*self.added_before, *ids, *self.added_after] if add_special_tokens else ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))


def harness_tokenizer(tokenizer: Tokenizer, hf_tokenizer=None) -> HarnessTokenizer:
    """`tokenizer` (ours) with the special-token rules of `hf_tokenizer` (transformers', as the export carries it);
    without one, none are added and the prefix is eos, as for an export of a trained BPE."""
    if hf_tokenizer is None:
        return HarnessTokenizer(tokenizer)
    plain = hf_tokenizer(SPECIAL_TOKENS_PROBE, add_special_tokens=False)["input_ids"]
    full = hf_tokenizer(SPECIAL_TOKENS_PROBE)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if start is None or plain != tokenizer.encode(SPECIAL_TOKENS_PROBE):
        raise DataError(f"transformers' tokenizer {hf_tokenizer.name_or_path!r} encodes text differently from the "
                        f"run's tokenizer {tokenizer.name!r}: pass the run's own tokenizer.")
    return HarnessTokenizer(tokenizer, tuple(full[:start]), tuple(full[start + len(plain):]),
                            hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)


def _run_tokenizer_spec(data_meta: dict | None) -> str | None:
    """The run's data.tokenizer as a spec load_tokenizer takes (a trained BPE is its prepared folder's file)."""
    if not data_meta or not data_meta.get("tokenizer"):
        return None
    if data_meta["tokenizer"] != "bpe":
        return data_meta["tokenizer"]
    return str(Path(data_meta.get("folder") or ".") / "tokenizer.json")


def run_tokenizer(weights) -> HarnessTokenizer:
    """The tokenizer of a read_weights() result: an --hf export's own (what lm-eval's hf backend loads), else the
    run's data.tokenizer with the special tokens of the transformers tokenizer mixln-export --hf would write."""
    from megatron_mixln.data.tokenizers import load_tokenizer

    folder = Path(weights.source)
    if any((folder / name).is_file() for name in TOKENIZER_FILES) and (folder / "config.json").is_file():
        from transformers import AutoTokenizer

        # Said explicitly: a Mix-LN folder names remote code (its model's), which a tokenizer never needs; left
        # unsaid, transformers would ask on a terminal.
        hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        spec = folder / "tokenizer.json"  # read by `tokenizers` directly: no second transformers load
        return harness_tokenizer(load_tokenizer(str(spec if spec.is_file() else folder)), hf)
    if _run_tokenizer_spec(weights.data_meta) is None:
        raise DataError(f"{folder} records no tokenizer (no data metadata and no tokenizer files): export it with "
                        "mixln-export --hf --tokenizer SPEC and evaluate that folder.")
    return data_tokenizer(weights.data_meta, weights.model_config.vocab_size, where=str(folder))


def data_tokenizer(data_meta: dict, vocab_size: int, where: str = "the run") -> HarnessTokenizer:
    """The run's data.tokenizer (its prepared data's metadata) with the special tokens of the transformers
    tokenizer that mixln-export --hf would write: what a run's own export is scored with, in or out of training."""
    from megatron_mixln.data.tokenizers import load_tokenizer
    from megatron_mixln.hf_interop import hf_tokenizer

    hf, problem = hf_tokenizer(data_meta, None, vocab_size)
    if hf is None:
        raise DataError(f"the tokenizer of {where} cannot be loaded: {problem}.")
    return harness_tokenizer(load_tokenizer(_run_tokenizer_spec(data_meta)), hf)


# ------------------------------------------------------------------------------------------------
# Scoring one process's model
# ------------------------------------------------------------------------------------------------
class ModelScorer:
    """score_batch over one unsplit MixLNForCausalLM (eval mode, no gradients): one forward to the final norm, then
    the LM head and a log-softmax (fp32 at least) at the positions with a target only, never over [B, T, V]."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype | None = None):
        self.model = model.eval() if dtype is None else model.to(dtype).eval()
        self.device = next(model.parameters()).device

    def _final_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        # The model's own forward with its head told not to project: [B, T, hidden] after the final norm.
        head = self.model.head
        head.project = False
        try:
            return self.model(input_ids.to(self.device))
        finally:
            head.project = True

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.to(self.device)
        hidden = self._final_hidden(input_ids)
        keep = labels != IGNORE_INDEX
        rows = keep.nonzero(as_tuple=True)[0]
        logits = self.model.lm_head(hidden[keep])  # [targets, vocab]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        targets = labels[keep]
        logprobs = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1).double()
        batch = labels.shape[0]
        sums = torch.zeros(batch, dtype=torch.float64, device=self.device).index_add_(0, rows, logprobs)
        misses = torch.zeros(batch, dtype=torch.long, device=self.device).index_add_(
            0, rows, (logits.argmax(-1) != targets).long())
        return sums.cpu(), (misses == 0).cpu()

    @torch.no_grad()
    def next_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The greedy next token after each row of `input_ids` (no padding)."""
        hidden = self._final_hidden(input_ids)[:, -1]
        return self.model.lm_head(hidden).argmax(-1).cpu()


def model_scorer(model: torch.nn.Module, dtype: torch.dtype | None = None) -> ModelScorer:
    """The single-process scorer of `model` (cast to `dtype` when given)."""
    return ModelScorer(model, dtype)


# ------------------------------------------------------------------------------------------------
# The lm-eval LM
# ------------------------------------------------------------------------------------------------
@register_model("mixln")
class MixLNLM(TemplateLM):
    """lm-eval's LM over a scorer: loglikelihood through TemplateLM._encode_pair (lm-eval's context/continuation
    boundary), loglikelihood_rolling through lm-eval's rolling windows, batches sorted by length as HFLM sorts
    them, left truncation to `max_length` (the model's max_seq_len) as HFLM truncates."""

    def __init__(self, scorer: Scorer, tokenizer: HarnessTokenizer, max_length: int, batch_size: int = 16,
                 max_gen_toks: int = 256, name: str = "mixln", disable_tqdm: bool = False):
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size!r} is invalid: expected an integer >= 1.")
        self.scorer = scorer
        self.harness_tokenizer = tokenizer
        self._max_length = max_length
        self._batch_size = batch_size
        self._max_gen_toks = max_gen_toks
        self.name = name
        self.disable_tqdm = disable_tqdm

    @property
    def eot_token_id(self) -> int:
        return self.harness_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.harness_tokenizer.prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.harness_tokenizer.tokenizer.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        # As HFLM.tok_encode: the tokenizer's default special tokens, except for a text that already starts with
        # the prefix token.
        if add_special_tokens is None:
            prefix_text = self.harness_tokenizer.decode([self.prefix_token_id])
            add_special_tokens = not (prefix_text and string.startswith(prefix_text))
        ids = self.harness_tokenizer.encode(string, add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise DataError(f"a request has {len(context)} context and {len(continuation)} continuation "
                                f"tokens: expected at least one of each and at most max_length={self.max_length} "
                                "continuation tokens.")
        # Longest first, as HFLM: each batch pads to its first row, and a memory error shows at once.
        ordered = Collator(requests, sort_fn=lambda req: (-len(req[1] + req[2]), tuple(req[1] + req[2])))
        results = []
        bar = tqdm(total=len(requests), desc="Running loglikelihood requests",
                   disable=disable_tqdm or self.disable_tqdm)
        for chunk in ordered.get_batched(n=self.batch_size):
            input_ids, labels = self._batch(chunk)
            sums, greedy = self.scorer(input_ids, labels)
            for (request, _, _), logprob, exact in zip(chunk, sums.tolist(), greedy.tolist()):
                answer = (float(logprob), bool(exact))
                results.append(answer)
                if request is not None:  # rolling windows are cached per document by loglikelihood_rolling
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(1)
        bar.close()
        return ordered.get_original(results)

    def _batch(self, chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs right-padded and labels in the training convention: the last max_length + 1 tokens of
        context + continuation (HFLM's left truncation), the continuation's tokens as the only targets."""
        rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in chunk]
        width = max(len(row) for row in rows) - 1
        pad = self.harness_tokenizer.tokenizer.pad_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (row, (_, _, continuation)) in enumerate(zip(rows, chunk)):
            input_ids[i, :len(row) - 1] = torch.tensor(row[:-1])
            start = len(row) - 1 - len(continuation)
            labels[i, start:len(row) - 1] = torch.tensor(continuation)
        return input_ids, labels

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        # HFLM's windows: disjoint rolling windows of max_length predictions after the prefix token.
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding, one request at a time, without a KV cache: simple and slow."""
        next_tokens = getattr(self.scorer, "next_tokens", None)
        if next_tokens is None:
            raise DataError("generate_until tasks need a scorer with next_tokens (the single-process model_scorer); "
                            "this one only scores log-likelihoods, so choose loglikelihood or multiple-choice tasks.")
        outputs = []
        eos_text = self.harness_tokenizer.decode([self.eot_token_id])
        for req in tqdm(requests, desc="Running generate_until requests", disable=disable_tqdm or self.disable_tqdm):
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            until = until + [eos_text] if eos_text not in until else until
            budget = int(gen_kwargs.get("max_gen_toks", self._max_gen_toks))
            ids = self.tok_encode(context, left_truncate_len=max(1, self.max_length - budget))
            new: list[int] = []
            text = ""
            for _ in range(budget):
                token = int(next_tokens(torch.tensor([(ids + new)[-self.max_length:]]))[0])
                if token == self.eot_token_id:
                    break
                new.append(token)
                text = self.harness_tokenizer.decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs
