"""Sequence packing: the real tokens of several rows share one row, so a forward runs (almost) no padding positions.

A scoring or update forward gets rows of prompt + response: left-padded prompts, right-padded responses, so each row's
real tokens are one contiguous run. With responses of different lengths much of a padded batch is padding (a
response of 10 tokens pays for the longest one's 128). :func:`pack_rows` places the runs first-fit-decreasing into
rows as wide as the longest run, with position ids that restart at 0 for each run; :func:`unpack` gathers the
decoder's outputs back into the padded layout, so the logprob, value and loss code never sees the packing.

The decoder is called with these ``position_ids`` and no attention mask. ``transformers`` then builds a causal mask
that stops at the sequence boundaries (a position id that does not follow the previous one starts a new sequence)
for the ``eager``, ``sdpa`` and ``flex_attention`` implementations, and ``flash_attention_2`` runs its
variable-length kernel. A model that ignores position ids or lets state cross sequences (for example a recurrent
layer) would silently mix rows: :func:`verify_packing` checks the decoder once before its first packed forward.

Cost model: attention still spans a whole packed row (``W x W`` scores, masked across sequences) except with the
flash-attention kernel; the projections, MLP and backward, which are most of the work, run only the packed
positions. Each row keeps its positions and attends only to its own tokens, so the results equal the padded forward
up to floating-point rounding (matmuls of another shape).
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_rlhf.modes import eval_mode

CONTEXT_LENGTH = 6
"""Tokens of the first sequence in :func:`verify_packing`'s probe row (the one a leaking model would attend to)."""
PROBE_LENGTH = 3
"""Tokens of the second sequence, whose hidden states the probe compares."""
LEAK_FRACTION = 0.1
"""The probe fails when the packed hidden states are closer to the leaking forward than this fraction of the
leaking forward's distance from the correct one would allow (see :func:`verify_packing`)."""
ROUNDING = {torch.float32: 1e-4, torch.float64: 1e-8}
"""Relative distance below which the packed and the unpacked hidden states count as equal, by dtype (1e-2 for
16-bit floats): rows of another shape round differently."""

_verified: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class PackedRows(NamedTuple):
    """The runs of a (B, L) batch packed into R rows of width W."""

    input_ids: Tensor
    """(R, W) long; slots after a row's last run hold ``pad_token_id``."""
    position_ids: Tensor
    """(R, W) long: 0, 1, ... within each run; every unused slot is 0 (a sequence of its own)."""
    index: Tensor
    """(B, L) long: the flat packed position (``row * W + column``) holding each original position; 0 for a
    padding position (any valid position would do: its output is padding in the original layout too)."""


def first_fit_decreasing(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """Place runs of the given lengths into rows of ``width`` slots: longest first, each into the first row with room.

    Args:
        lengths: run length of each sequence, each in ``[0, width]``.
        width: slots per row.
    Returns:
        ``(row, offset)`` for each sequence in input order; rows are numbered from 0 in the order they are opened.
        A sequence of length 0 gets ``(0, 0)`` and occupies nothing.
    """
    if any(n < 0 or n > width for n in lengths):
        raise ValueError(f"Every length must be in [0, {width}], got {lengths}.")
    used: list[int] = []  # slots taken in each open row
    place = [(0, 0)] * len(lengths)
    for seq in sorted(range(len(lengths)), key=lambda s: -lengths[s]):  # stable: ties keep input order
        if lengths[seq] == 0:
            continue
        row = next((r for r, taken in enumerate(used) if taken + lengths[seq] <= width), len(used))
        if row == len(used):
            used.append(0)
        place[seq] = (row, used[row])
        used[row] += lengths[seq]
    return place


def pack_rows(
    input_ids: Tensor, attention_mask: Tensor, pad_token_id: int = 0, option: str = "model.ppo.packing"
) -> PackedRows:
    """Pack each row's run of real tokens (see the module docstring).

    Args:
        input_ids: (B, L) long.
        attention_mask: (B, L) bool or int, True/1 for a real token; each row's real tokens must be contiguous.
        pad_token_id: the id written into unused slots (any id the model accepts).
        option: the recipe field that turned packing on, named in the error.
    Returns:
        A :class:`PackedRows` with ``W`` = the longest run and ``R`` <= B rows.
    """
    mask = attention_mask.bool()
    batch, width_in = mask.shape
    device = input_ids.device
    lengths = mask.sum(-1)  # (B,)
    first = mask.int().argmax(-1)  # (B,) first real position (0 for an empty row)
    last = width_in - 1 - mask.flip(-1).int().argmax(-1)
    contiguous = (last - first + 1 == lengths) | (lengths == 0)
    host_lengths, host_contiguous = torch.stack([lengths, contiguous.long()]).tolist()  # one host read
    if not all(host_contiguous):
        rows = [b for b, ok in enumerate(host_contiguous) if not ok]
        raise ValueError(
            f"Packing needs each row's real tokens to be contiguous (left-padded prompt + right-padded response); "
            f"rows {rows} have padding between real tokens. Set {option}: false for such inputs."
        )
    width = max(max(host_lengths), 1)
    place = first_fit_decreasing(host_lengths, width)
    num_rows = max((row for (row, _), n in zip(place, host_lengths, strict=True) if n), default=0) + 1
    starts = torch.tensor([row * width + offset for row, offset in place], device=device)  # (B,) packed start
    total = sum(host_lengths)
    seq = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=total)  # (N,)
    within = torch.arange(total, device=device) - (lengths.cumsum(0) - lengths).repeat_interleave(
        lengths, output_size=total
    )  # (N,) 0, 1, ... within each run
    source = seq * width_in + first[seq] + within  # (N,) flat original position
    target = starts[seq] + within  # (N,) flat packed position
    packed_ids = input_ids.new_full((num_rows * width,), pad_token_id).index_copy(
        0, target, input_ids.reshape(-1)[source]
    )
    position_ids = torch.zeros(num_rows * width, dtype=torch.long, device=device).index_copy(0, target, within)
    index = torch.zeros(batch * width_in, dtype=torch.long, device=device).index_copy(0, source, target)
    return PackedRows(
        input_ids=packed_ids.view(num_rows, width),
        position_ids=position_ids.view(num_rows, width),
        index=index.view(batch, width_in),
    )


def unpack(packed: Tensor, index: Tensor) -> Tensor:
    """Outputs of a packed forward in the original layout.

    Args:
        packed: (R, W, ...) per-position outputs of the packed rows.
        index: (B, S) flat packed positions, :attr:`PackedRows.index` or a column slice of it.
    Returns:
        (B, S, ...) ``packed`` at those positions (a gather: gradients flow back to the packed positions).
    """
    flat = packed.reshape(packed.shape[0] * packed.shape[1], *packed.shape[2:])
    return flat[index.reshape(-1)].view(*index.shape, *packed.shape[2:])


@torch.no_grad()
def verify_packing(decoder: nn.Module, option: str = "model.ppo.packing") -> None:
    """Check once per decoder that a packed forward keeps sequences apart; raise ``ValueError`` if it does not.

    A probe row packs a context sequence ``a`` and a sequence ``b``. ``b``'s hidden states must match ``b`` run alone,
    and not ``b`` read as the continuation of ``a`` (what a model that attends across the boundary, or ignores the
    restarted position ids, computes). Runs in eval mode (no dropout) and without autocast; training flags are
    restored.

    Args:
        decoder: the causal LM's decoder (``get_decoder()``), called with ``input_ids``, ``position_ids`` and
            ``attention_mask`` as ``transformers`` decoders are.
        option: the recipe field that turned packing on, named in the error.
    """
    if decoder in _verified:
        return
    vocab = decoder.get_input_embeddings().num_embeddings
    device = decoder.get_input_embeddings().weight.device
    ids = torch.arange(CONTEXT_LENGTH + PROBE_LENGTH, device=device).mul(7919).remainder(vocab)[None]  # (1, A + P)
    context_positions = torch.arange(CONTEXT_LENGTH, device=device)
    probe_positions = torch.arange(PROBE_LENGTH, device=device)
    ones = torch.ones_like(ids)
    # In the weights' own dtype even inside an autocast region (bf16-mixed): the check is about the masks, and float32
    # rounding keeps its threshold tight.
    with eval_mode(decoder), torch.autocast(device.type, enabled=False):
        packed = _probe_hidden(decoder, ids, torch.cat([context_positions, probe_positions]), None)
        leaked = _probe_hidden(decoder, ids, torch.arange(ids.shape[1], device=device), ones)
        alone = _probe_hidden(decoder, ids[:, CONTEXT_LENGTH:], probe_positions, ones[:, CONTEXT_LENGTH:])
    error = float((packed - alone).norm())
    leak = float((leaked - alone).norm())
    rounding = ROUNDING.get(decoder.get_input_embeddings().weight.dtype, 1e-2) * float(alone.norm())
    if error > max(LEAK_FRACTION * leak, rounding):
        raise ValueError(
            f"{option}: {type(decoder).__name__} does not keep packed sequences apart (a packed sequence's hidden "
            f"states differ from the sequence run alone by {error:.3g}; reading it after the previous sequence "
            f"differs by {leak:.3g}). Its attention or recurrent state crosses sequence boundaries, or it ignores "
            f"position_ids. Set {option}: false."
        )
    _verified.add(decoder)


def _probe_hidden(decoder: nn.Module, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(PROBE_LENGTH, H) float32 hidden states of the last positions of a one-row forward."""
    out = decoder(input_ids=input_ids, position_ids=position_ids[None], attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state[0, -PROBE_LENGTH:].float()
