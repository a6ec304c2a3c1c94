"""What every relevancy method reads: one example's captured attention, gradients and layout.

``Captured`` holds the schema's full ``(layer, head, token, token)`` frame (rows = queries)
plus what is needed to interpret it: the kind of each attention module, the modality of
each token, the tokens the output heads read and the explained target. Methods work on the
real tokens only (``seq_len``); padded heads (NaN) are left out of every head mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import xarray as xr

from vlinterpret_panel.errors import VLIError
from vlinterpret_panel.schema import IMAGE, LAYER_KINDS, MODALITIES, PAD, TEXT, ExampleRecord, ModelInfo

SELF_KINDS = ("self", "text_self", "image_self")
CROSS_KINDS = ("cross_text_to_image", "cross_image_to_text")
# Per layer kind: (stream of its queries, stream of its keys); "all" = every real token.
KIND_STREAMS = {
    "self": ("all", "all"),
    "text_self": (TEXT, TEXT),
    "image_self": (IMAGE, IMAGE),
    "cross_text_to_image": (TEXT, IMAGE),
    "cross_image_to_text": (IMAGE, TEXT),
}
BOTH_STREAMS = "text+image"


@dataclass(frozen=True)
class Captured:
    """One example's attention, its gradients and its token layout, as relevancy methods need them.

    ``attention``/``attention_gradient``/``attention_relevance`` are ``(layer, head, T, T)``
    in the schema's full frame; ``attention_relevance`` is the LRP relevance of each attention
    map, needed only by ``transformer_attribution``; ``token_relevance`` ``(T,)`` is AttnLRP's relevance
    of each token's embedding, needed only by ``attnlrp``. ``readout_tokens`` maps output-head names
    to the token each head reads (e.g. ``{"answer": 0}`` or ``{"text": 7, "image": 8}``).
    Tokens ``>= seq_len`` are padding; by default ``seq_len`` counts the non-``pad`` tokens.
    """

    attention: np.ndarray
    layer_kind: Sequence[str]
    modality: Sequence[str]
    readout_tokens: Mapping[str, int]
    target: str = ""
    attention_gradient: np.ndarray | None = None
    attention_relevance: np.ndarray | None = None
    token_relevance: np.ndarray | None = None
    seq_len: int | None = None
    example_id: str = ""

    def __post_init__(self) -> None:
        where = f"captured example {self.example_id!r}" if self.example_id else "captured example"
        attention = _float_array(self.attention)
        if attention.ndim != 4 or attention.shape[2] != attention.shape[3]:
            raise VLIError(f"{where}: attention must be (layer, head, token, token), got {attention.shape}")
        n_layers, _, n_tokens, _ = attention.shape
        object.__setattr__(self, "attention", attention)
        object.__setattr__(self, "layer_kind", tuple(str(k) for k in self.layer_kind))
        object.__setattr__(self, "modality", tuple(str(m) for m in self.modality))
        object.__setattr__(self, "readout_tokens", {str(k): int(v) for k, v in self.readout_tokens.items()})
        for name in ("attention_gradient", "attention_relevance"):
            values = getattr(self, name)
            if values is None:
                continue
            values = _float_array(values)
            if values.shape != attention.shape:
                raise VLIError(f"{where}: {name} has shape {values.shape}, attention has {attention.shape}")
            object.__setattr__(self, name, values)
        if self.token_relevance is not None:
            per_token = _float_array(self.token_relevance)
            if per_token.shape != (n_tokens,):
                raise VLIError(f"{where}: token_relevance has shape {per_token.shape}, expected ({n_tokens},)")
            object.__setattr__(self, "token_relevance", per_token)
        if len(self.layer_kind) != n_layers:
            raise VLIError(f"{where}: {len(self.layer_kind)} layer kinds for {n_layers} attention layers")
        unknown = sorted(set(self.layer_kind) - set(LAYER_KINDS))
        if unknown:
            raise VLIError(f"{where}: unknown layer kind(s) {unknown}; use one of {sorted(LAYER_KINDS)}")
        if len(self.modality) != n_tokens:
            raise VLIError(f"{where}: {len(self.modality)} modality labels for {n_tokens} tokens")
        bad = sorted(set(self.modality) - set(MODALITIES))
        if bad:
            raise VLIError(f"{where}: unknown modality {bad}; use one of {list(MODALITIES)}")
        seq_len = sum(m != PAD for m in self.modality) if self.seq_len is None else int(self.seq_len)
        if not 1 <= seq_len <= n_tokens or any(m == PAD for m in self.modality[:seq_len]):
            raise VLIError(f"{where}: seq_len {seq_len} does not match the padding ('pad' must mark the tail)")
        object.__setattr__(self, "seq_len", seq_len)
        if not self.readout_tokens:
            raise VLIError(f"{where}: no readout token; the adapter must say which token each output head reads")
        for name, token in self.readout_tokens.items():
            if not 0 <= token < seq_len:
                raise VLIError(f"{where}: readout token {name!r} = {token} is not a real token (0..{seq_len - 1})")
        self._check_finite(where)

    def _check_finite(self, where: str) -> None:
        """NaN is allowed only for padded heads and tokens; anything else is corrupt data."""
        if self.token_relevance is not None and not np.isfinite(self.token_relevance[: self.n_tokens]).all():
            raise VLIError(f"{where}: token_relevance has NaN or infinite values in real tokens")
        for name in ("attention", "attention_gradient", "attention_relevance"):
            values = getattr(self, name)
            if values is None:
                continue
            for layer in range(values.shape[0]):
                real = self.real(values)[layer][self.head_mask[layer]]
                if not np.isfinite(real).all():
                    raise VLIError(
                        f"{where}: {name} has NaN or infinite values in real heads and tokens (layer {layer})"
                    )

    @classmethod
    def from_record(cls, record: ExampleRecord, info: ModelInfo) -> Captured:
        """Build from an adapter's ``run(..., gradients=True)`` output (gradients may be absent)."""
        if not record.readout_tokens:
            raise VLIError(f"example {record.example_id!r}: the adapter gave no readout_tokens")
        return cls(
            attention=record.full_attention(),
            attention_gradient=record.attention_gradient,
            layer_kind=info.layer_kind,
            modality=record.modality,
            readout_tokens=record.readout_tokens,
            target=record.relevancy_target or record.prediction or "",
            example_id=record.example_id,
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, example: str | int) -> Captured:
        """Build from one stored example (no gradients are stored: raw attention and rollout only)."""
        item = ds.isel(example=example) if isinstance(example, int) else ds.sel(example=example)
        if "readout_token" not in ds:
            raise VLIError("the store has no 'readout_token' variable; relevancy needs the token each head reads")
        readouts = {
            str(name): int(token)
            for name, token in zip(item["readout"].values, item["readout_token"].values, strict=True)
            if int(token) >= 0
        }
        target = str(item["prediction"].values) if "prediction" in item else ""
        return cls(
            attention=item["attention"].values,
            layer_kind=ds["layer_kind"].values.tolist(),
            modality=item["modality"].values.tolist(),
            readout_tokens=readouts,
            target=target,
            seq_len=int(item["seq_len"]),
            example_id=str(item["example"].values),
        )

    @property
    def n_tokens(self) -> int:
        """Number of real (unpadded) tokens."""
        return int(self.seq_len or 0)  # set in __post_init__

    @cached_property
    def head_mask(self) -> np.ndarray:
        """``(layer, head)`` True for real heads: padded heads are NaN over every real token."""
        n = self.n_tokens
        return ~np.isnan(self.attention[:, :, :n, :n]).all(axis=(2, 3))

    def real(self, values: np.ndarray) -> np.ndarray:
        """Cut a ``(layer, head, T, T)`` array to the real tokens."""
        return values[:, :, : self.n_tokens, : self.n_tokens]

    @cached_property
    def streams(self) -> dict[str, np.ndarray]:
        """Bool masks of the text and image streams over the real tokens.

        A token belongs to the stream whose modules use it as a query (so special tokens
        follow the module that lists them). A stream without any module falls back to the
        tokens of its modality that no module claims (e.g. image features that no layer
        updates in a decoder-style model).
        """
        n = self.n_tokens
        attention = self.real(self.attention)
        claimed = {TEXT: np.zeros(n, bool), IMAGE: np.zeros(n, bool)}
        has_module = {TEXT: False, IMAGE: False}
        for layer, kind in enumerate(self.layer_kind):
            stream = KIND_STREAMS[kind][0]
            if stream == "all":
                continue
            heads = attention[layer][self.head_mask[layer]]
            claimed[stream] |= heads.sum(axis=2).max(axis=0) > 0
            has_module[stream] = True
        if (claimed[TEXT] & claimed[IMAGE]).any():
            token = int(np.flatnonzero(claimed[TEXT] & claimed[IMAGE])[0])
            raise VLIError(f"token {token} is a query of both text and image modules; streams must be disjoint")
        modality = np.asarray(self.modality[:n])
        for stream in (TEXT, IMAGE):
            if not has_module[stream]:
                other = IMAGE if stream == TEXT else TEXT
                claimed[stream] = (modality == stream) & ~claimed[other]
        return claimed

    def token_set(self, stream: str) -> np.ndarray:
        """Bool mask over real tokens of ``stream`` ("text", "image" or "all")."""
        if stream == "all":
            return np.ones(self.n_tokens, bool)
        return self.streams[stream]

    def block(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Bool masks of the query tokens and key tokens of one attention module."""
        query_stream, key_stream = KIND_STREAMS[self.layer_kind[layer]]
        return self.token_set(query_stream), self.token_set(key_stream)

    def readout_plan(self, readout: str | None) -> tuple[str, list[tuple[int, np.ndarray]]]:
        """Resolve the ``readout`` option to (its name, [(readout token, columns it fills)]).

        ``None`` takes the only readout, or both towers' readouts when the adapter names
        ``text`` and ``image`` ones (dual encoders). ``"text+image"`` asks for that explicitly:
        text-stream columns come from the text readout's row, image-stream columns from the
        image readout's row.
        """
        names = sorted(self.readout_tokens)
        if readout is None:
            if len(names) == 1:
                readout = names[0]
            elif {TEXT, IMAGE} <= set(names):
                readout = BOTH_STREAMS
            else:
                raise VLIError(f"several readout tokens {names}: choose one with readout=...")
        if readout == BOTH_STREAMS:
            if not {TEXT, IMAGE} <= set(names):
                raise VLIError(f"readout {BOTH_STREAMS!r} needs 'text' and 'image' readout tokens, have {names}")
            return readout, [
                (self.readout_tokens[TEXT], self.streams[TEXT]),
                (self.readout_tokens[IMAGE], self.streams[IMAGE]),
            ]
        if readout not in self.readout_tokens:
            raise VLIError(f"unknown readout {readout!r}; this example has {names} (or {BOTH_STREAMS!r})")
        return readout, [(self.readout_tokens[readout], np.ones(self.n_tokens, bool))]

    def require(self, name: str, method: str) -> np.ndarray:
        """Return ``attention_gradient``, ``attention_relevance`` or ``token_relevance``, or explain how to get it."""
        values = getattr(self, name)
        if values is not None:
            return values
        if name == "attention_gradient":
            raise VLIError(
                f"{method} needs attention gradients: run the adapter with gradients=True "
                "(grad enabled, not under torch.no_grad or inference_mode)"
            )
        if name == "token_relevance":
            raise VLIError(
                f"{method} needs AttnLRP's relevance of each token (token_relevance): use "
                "relevancy.capture.capture_for (built-in models only; Hugging Face models have no AttnLRP rules here)"
            )
        raise VLIError(
            f"{method} needs the LRP relevance of each attention map (attention_relevance): "
            "use relevancy.capture.capture_for (built-in models only; Hugging Face models have no LRP rules)"
        )


def _float_array(values: np.ndarray) -> np.ndarray:
    """The array as floats without copying float32/float64 input (maps can be large)."""
    array = np.asarray(values)
    return array if array.dtype in (np.float32, np.float64) else array.astype(np.float64)
