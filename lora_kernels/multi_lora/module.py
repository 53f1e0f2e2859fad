"""``MultiLoRALinear``: one frozen ``nn.Linear`` serving (and training) several adapters per batch."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..functional import check_dropout, lora_scaling, merge_lora_, unmerge_lora_
from .functional import _in_graph, check_adapter_ids, multi_lora_linear

AdapterSpec = Union[tuple, Mapping]


class MultiLoRALinear(nn.Module):
    """A frozen base layer plus up to ``capacity`` LoRA adapters; each row of a batch picks one.

    ``forward(x, adapter_ids)``: ``adapter_ids`` (int64 slot indices, ``-1`` for the base model
    only) has shape ``x.shape[:-1]`` or a leading part of it (``(batch,)`` for ``(batch, seq, in)``).
    :meth:`adapter_ids` turns adapter names into such a tensor. The ids' values are checked (in
    range, occupied slots, the merged adapter only) at the cost of one host synchronisation per
    call; that check is skipped while a CUDA graph is captured and under torch.compile, and
    ``check_ids = False`` switches it off (rows with an out-of-range id then get the base output;
    an empty slot holds zeros, so its rows get the base output too).

    The factors live in preallocated slots: ``lora_A`` ``(capacity, r_max, in)`` and ``lora_B``
    ``(capacity, out, r_max)`` parameters, ``scaling`` a ``(capacity,)`` buffer. An adapter of rank
    ``r < r_max`` occupies the first ``r`` rows of ``A`` (columns of ``B``); the rest is zero and
    stays exactly zero under training, because its gradients are exactly zero (``dB[:, r:] =
    dyᵀ xa[:, r:]`` with ``xa[:, r:] = 0``, and ``dA[r:] = g[:, r:]ᵀ x`` with ``g[:, r:] = 0``).
    :meth:`add_adapter`, :meth:`remove_adapter` and :meth:`swap_adapter` copy into a slot in
    place: no other adapter is touched, nothing is reallocated, and compiled graphs or captured
    CUDA graphs stay valid (they read the same storage).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        capacity: int = 8,
        r_max: int = 16,
        dropout: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
        lora_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach(base.weight, base.bias, capacity, r_max, dropout, backend, lora_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        adapters: Optional[Mapping[str, AdapterSpec]] = None,
        capacity: Optional[int] = None,
        r_max: Optional[int] = None,
        dropout: float = 0.0,
        backend: str = "auto",
        lora_dtype: Optional[torch.dtype] = None,
    ) -> "MultiLoRALinear":
        """Wrap ``linear`` (sharing and freezing its weight and bias) with the given adapters.

        ``adapters`` maps names to ``(r, alpha)`` or to keyword arguments of :meth:`add_adapter`.
        ``capacity`` defaults to ``max(8, len(adapters))`` slots, ``r_max`` to the largest rank.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        specs = {name: (dict(zip(("r", "alpha"), spec)) if isinstance(spec, (tuple, list)) else dict(spec))
                 for name, spec in (adapters or {}).items()}
        ranks = [s.get("r") for s in specs.values()]
        for name, r in zip(specs, ranks):
            lora_scaling(r, 1.0)  # a clear error for a bad rank, before anything is built
        capacity = max(8, len(specs)) if capacity is None else capacity
        r_max = max(ranks, default=8) if r_max is None else r_max
        if len(specs) > capacity:
            raise ValueError(f"{len(specs)} adapters do not fit in capacity={capacity}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach(linear.weight, linear.bias, capacity, r_max, dropout, backend, lora_dtype)
        for name, spec in specs.items():
            self.add_adapter(name, **spec)
        self.train(linear.training)
        return self

    def _attach(self, weight, bias, capacity, r_max, dropout, backend, lora_dtype) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        lora_scaling(r_max, 1.0)
        check_dropout(dropout)
        self.out_features, self.in_features = weight.shape
        self.capacity, self.r_max, self.dropout, self.backend = capacity, r_max, float(dropout), backend
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight, self.bias = weight, bias
        factory = dict(device=weight.device, dtype=lora_dtype or weight.dtype)
        self.lora_A = nn.Parameter(torch.zeros(capacity, r_max, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(capacity, self.out_features, r_max, **factory))
        s_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.register_buffer("scaling", torch.zeros(capacity, device=weight.device, dtype=s_dtype))
        self.register_buffer("_occupied", torch.zeros(capacity, device=weight.device, dtype=torch.bool),
                             persistent=False)
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.merged_adapter: Optional[str] = None
        self.check_ids = True

    # ------------------------------------------------------------------ adapters

    def slot(self, name: str) -> int:
        if name not in self.slots:
            raise KeyError(f"no adapter named {name!r}; adapters: {sorted(self.slots)}")
        return self.slots[name]

    def adapter_ids(self, names: Sequence[Optional[str]], device=None) -> Tensor:
        """The slot of each name (``None``: -1, the base model) as an int64 tensor."""
        ids = [-1 if name is None else self.slot(name) for name in names]
        return torch.tensor(ids, dtype=torch.int64, device=device or self.weight.device)

    def _check_factors(self, r: int, lora_A: Optional[Tensor], lora_B: Optional[Tensor]) -> None:
        if not isinstance(r, int) or isinstance(r, bool) or not 0 < r <= self.r_max:
            raise ValueError(f"adapter rank must be an integer in [1, r_max={self.r_max}], got {r!r}")
        if (lora_A is None) != (lora_B is None):
            raise ValueError("give both lora_A and lora_B, or neither")
        if lora_A is not None:
            if tuple(lora_A.shape) != (r, self.in_features) or tuple(lora_B.shape) != (self.out_features, r):
                raise ValueError(
                    f"lora_A must be ({r}, {self.in_features}) and lora_B ({self.out_features}, {r}), "
                    f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
                )
            if not (lora_A.is_floating_point() and lora_B.is_floating_point()):
                raise TypeError("lora_A and lora_B must be floating point")

    @torch.no_grad()
    def _write(self, slot: int, r: int, alpha: float, use_rslora: bool, init: str,
               lora_A: Optional[Tensor], lora_B: Optional[Tensor]) -> None:
        A = self.lora_A[slot]
        B = self.lora_B[slot]
        if lora_A is None:
            fresh = torch.empty(r, self.in_features, device=A.device, dtype=A.dtype)
            if init == "kaiming":
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5))
            else:
                nn.init.normal_(fresh, std=1.0 / r)
            lora_A, lora_B = fresh, torch.zeros(self.out_features, r, device=B.device, dtype=B.dtype)
        A.zero_()
        B.zero_()
        A[:r].copy_(lora_A)
        B[:, :r].copy_(lora_B)
        self.scaling[slot] = lora_scaling(r, alpha, use_rslora)
        self._occupied[slot] = True

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float = 8.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        lora_A: Optional[Tensor] = None,
        lora_B: Optional[Tensor] = None,
    ) -> int:
        """Put an adapter into a free slot and return the slot.

        New factors start as in :class:`~lora_kernels.LoRALinear` (``A`` Kaiming-uniform or
        Gaussian, ``B`` zero), or are copied from ``lora_A (r, in)`` / ``lora_B (out, r)``.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self.slots:
            raise ValueError(f"an adapter named {name!r} exists already; use swap_adapter to replace it")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        self._check_factors(r, lora_A, lora_B)
        scaling = lora_scaling(r, alpha, use_rslora)
        if not math.isfinite(scaling):
            raise ValueError(f"scaling must be finite, got alpha={alpha!r}")
        free = [i for i in range(self.capacity) if i not in self.slots.values()]
        if not free:
            raise RuntimeError(
                f"all {self.capacity} adapter slots are in use; remove one first or build the layer "
                "with a larger capacity"
            )
        slot = free[0]
        self._write(slot, r, alpha, use_rslora, init, lora_A, lora_B)
        self.slots[name], self.ranks[name], self.alphas[name] = slot, r, float(alpha)
        return slot

    def swap_adapter(
        self, name: str, lora_A: Tensor, lora_B: Tensor, alpha: Optional[float] = None, use_rslora: bool = False
    ) -> None:
        """Hot-swap: copy new factors (rank ≤ r_max, may differ from the old) into ``name``'s slot."""
        slot = self.slot(name)
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the weight; call unmerge() before swapping it")
        r = lora_A.shape[0] if lora_A.dim() == 2 else -1
        self._check_factors(r, lora_A, lora_B)
        alpha = self.alphas[name] if alpha is None else float(alpha)
        if not math.isfinite(lora_scaling(r, alpha, use_rslora)):
            raise ValueError(f"scaling must be finite, got alpha={alpha!r}")
        self._write(slot, r, alpha, use_rslora, "kaiming", lora_A, lora_B)
        self.ranks[name], self.alphas[name] = r, alpha

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Free ``name``'s slot (its factors are zeroed); batches may no longer refer to it."""
        slot = self.slot(name)
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the weight; call unmerge() before removing it")
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scaling[slot] = 0.0
        self._occupied[slot] = False
        del self.slots[name], self.ranks[name], self.alphas[name]

    # ------------------------------------------------------------------ forward

    def _check_ids(self, x: Tensor, adapter_ids: Tensor) -> None:
        """Shape, dtype and values (in range, occupied slots, the merged adapter only): one host sync."""
        check_adapter_ids(adapter_ids, x, self.capacity, check_values=False)
        if not self.check_ids or not adapter_ids.numel() or _in_graph(adapter_ids):
            return
        valid = (adapter_ids >= -1) & (adapter_ids < self.capacity)
        used = self._occupied[adapter_ids.clamp(0, self.capacity - 1)] | (adapter_ids == -1)
        if self.merged_adapter is not None:
            used = used & (adapter_ids == self.slots[self.merged_adapter])
        if bool((valid & used).all()):
            return
        if not bool(valid.all()):
            wrong = sorted(set(adapter_ids[~valid].tolist()))[:8]
            raise ValueError(f"adapter_ids must be in [-1, {self.capacity}) (-1: the base model only); got {wrong}")
        if self.merged_adapter is not None:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the weight, so this layer can only serve "
                "batches whose every row uses it; this batch mixes in other adapters (or -1, the base "
                "model): call unmerge() first"
            )
        empty = sorted(set(adapter_ids[~used].tolist()))[:8]
        raise ValueError(f"adapter_ids refer to empty slots {empty}; occupied: {dict(sorted(self.slots.items()))}")

    def forward(self, x: Tensor, adapter_ids: Union[Tensor, Sequence[Optional[str]]]) -> Tensor:
        if not isinstance(adapter_ids, Tensor):
            adapter_ids = self.adapter_ids(adapter_ids, device=x.device)
        self._check_ids(x, adapter_ids)
        if self.merged_adapter is not None:
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise RuntimeError(
                    f"MultiLoRALinear has adapter {self.merged_adapter!r} merged: it cannot be trained in "
                    "this state; call unmerge() before training (or eval() / torch.no_grad() for inference)"
                )
            return nn.functional.linear(x, self.weight, self.bias)
        return multi_lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, adapter_ids,
            dropout_p=self.dropout if self.training else 0.0, backend=self.backend, check_ids=False,
        )

    # ------------------------------------------------------------------ merge

    def _factors(self, name: str) -> tuple[Tensor, Tensor, float]:
        slot, r = self.slot(name), self.ranks[name]
        return self.lora_A.data[slot, :r], self.lora_B.data[slot, :, :r], float(self.scaling[slot])

    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into ``weight``: forward then costs the base GEMM, and serves only
        batches whose every row uses ``name`` (others are refused until :meth:`unmerge`)."""
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is merged already; call unmerge() first")
        A, B, s = self._factors(name)
        merge_lora_(self.weight.data, A, B, s, self.backend)
        self.merged_adapter = name

    def unmerge(self) -> None:
        """Subtract the merged adapter from ``weight`` again (to within one rounding per element)."""
        if self.merged_adapter is None:
            raise RuntimeError("no adapter is merged; nothing to unmerge")
        A, B, s = self._factors(self.merged_adapter)
        unmerge_lora_(self.weight.data, A, B, s, self.backend)
        self.merged_adapter = None

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict:
        return {"slots": dict(self.slots), "ranks": dict(self.ranks), "alphas": dict(self.alphas)}

    def set_extra_state(self, state: dict) -> None:
        slots = dict(state["slots"])
        if any(not 0 <= s < self.capacity for s in slots.values()):
            raise ValueError(f"saved slots {slots} do not fit capacity={self.capacity}")
        self.slots, self.ranks, self.alphas = slots, dict(state["ranks"]), dict(state["alphas"])
        with torch.no_grad():
            self._occupied.zero_()
            for s in slots.values():
                self._occupied[s] = True

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"capacity={self.capacity}, r_max={self.r_max}, adapters={dict(self.ranks)}, dropout={self.dropout}, "
            f"backend={self.backend!r}, merged_adapter={self.merged_adapter!r}"
        )
