"""The two sparse weight encodings of compressed-tensors checkpoints, one 2-D weight at a time.

compressed-tensors 0.20 (our pin) still defines the formats (`BitmaskConfig`, `Sparse24BitMaskConfig`) and the
bit packing (`pack_bitmasks` / `unpack_bitmasks`) but no longer ships the compressors; checkpoints written by
0.14.0.1 and earlier (llm-compressor's SparseGPT/Wanda output) use exactly these tensors, per Linear `PREFIX`
(the module name, without `.weight`):

  sparse-bitmask     PREFIX.shape (int64 [rows, cols]), PREFIX.compressed (the kept values, 1-D, row-major),
                     PREFIX.bitmask (uint8 [rows, ceil(cols / 8)], little-endian bits: 1 = kept),
                     PREFIX.row_offsets (int64 [rows]: where each row starts in .compressed)
  sparse-24-bitmask  PREFIX.shape (int64 [[rows], [cols]]), PREFIX.compressed ([rows, cols / 2]: 2 values per group
                     of 4 along a row), PREFIX.bitmask (as above)

A position is kept when its bits are not all zero, so -0.0 survives and decoding is bit-identical (the library
tested `!= 0`, which turns a stored -0.0 into +0.0; files stay readable both ways).
"""
from __future__ import annotations

import torch
from compressed_tensors.utils import pack_bitmasks, unpack_bitmasks

SPARSE_BITMASK, SPARSE_24_BITMASK = "sparse-bitmask", "sparse-24-bitmask"
PARAMS = {SPARSE_BITMASK: ("shape", "compressed", "bitmask", "row_offsets"),
          SPARSE_24_BITMASK: ("shape", "compressed", "bitmask")}
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def kept(weight: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries whose bit pattern is not +0.0."""
    return weight.view(_INT_VIEW[weight.element_size()]) != 0


def is_24(weight: torch.Tensor) -> bool:
    """True for a 2-D weight with at most 2 kept entries in every group of 4 consecutive entries of a row."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((kept(weight).view(weight.shape[0], -1, 4).sum(-1) <= 2).all())


def encode_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    weight = weight.detach().cpu().contiguous()
    mask = kept(weight)
    counts = mask.sum(-1)
    return {"shape": torch.tensor(list(weight.shape)), "compressed": weight[mask],
            "bitmask": pack_bitmasks(mask), "row_offsets": torch.cumsum(counts, 0) - counts}


def encode_24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Requires is_24(weight). In a group with fewer than 2 kept entries, +0.0 entries fill the two slots."""
    weight = weight.detach().cpu().contiguous()
    rows, cols = weight.shape
    groups = kept(weight).view(-1, 4)
    # Stable sort puts the kept entries of each group first; the first two slots are what is stored.
    slots = torch.sort(groups.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :2]
    mask = torch.zeros_like(groups).scatter_(1, slots, True).view(rows, cols)
    return {"shape": torch.tensor([[rows], [cols]]), "compressed": weight[mask].view(rows, cols // 2),
            "bitmask": pack_bitmasks(mask)}


def decode(parts: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """The dense weight from the tensors of one PREFIX (either format); `where` names it in errors."""
    shape = [int(x) for x in parts["shape"].flatten().tolist()]
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"{where}.shape is {shape}: a sparse weight must be 2-D")
    values = parts["compressed"].flatten()
    expected_mask = (shape[0], (shape[1] + 7) // 8)
    if tuple(parts["bitmask"].shape) != expected_mask or parts["bitmask"].dtype != torch.uint8:
        raise ValueError(f"{where}.bitmask has shape {tuple(parts['bitmask'].shape)} "
                         f"{parts['bitmask'].dtype}, expected {expected_mask} uint8 for a {shape} weight")
    mask = unpack_bitmasks(parts["bitmask"], shape)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"{where}: the bitmask marks {int(mask.sum())} entries but .compressed holds "
                         f"{values.numel()} values")
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values  # boolean indexing runs row-major, the order the values were stored in
    return dense
