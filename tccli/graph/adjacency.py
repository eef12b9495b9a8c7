"""Sparse storage of an attribution graph's computed rows (docs/method.md section 9). Pure math.

**Sparse rows.** A row is stored as its nonzero entries (CSR: ``crow``, int32 ``col``, values), after
dropping its smallest entries while their absolute sum stays within ``drop_mass`` of the row's absolute
sum; the dropped entries' signed and absolute sums are kept per row, so nothing is lost silently and the
identity ``sum(row) + dropped + bias == value`` still holds exactly.

Here: one chunk of rows (``SparseRows``), the adjacency as a list of chunks (``Adjacency``), and dense
rows made sparse (``sparsify``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SparseRows:
    """A chunk of computed rows of the adjacency, stored sparsely (CSR over the table's node indices).

    For every row: sum(entries) + dropped + bias == value (up to float rounding)."""

    nodes: torch.Tensor  # [R] int64: the node each row belongs to
    crow: torch.Tensor  # [R+1] int64
    col: torch.Tensor  # [nnz] int32: source node
    value: torch.Tensor  # [nnz]
    bias: torch.Tensor  # [R] constant terms
    target_value: torch.Tensor  # [R] the row's real value
    dropped: torch.Tensor  # [R] signed sum of entries not stored
    dropped_abs: torch.Tensor  # [R] their absolute sum
    total_abs: torch.Tensor  # [R] absolute sum of the whole row (stored + dropped)
    entry_rows: Optional[torch.Tensor] = None  # [nnz] int32 row of each entry, kept where cheap to keep

    @property
    def n_rows(self) -> int:
        return int(self.nodes.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.col.shape[0])

    def row_ids(self) -> torch.Tensor:
        """[nnz]: the row (within this chunk) of every entry."""
        if self.entry_rows is not None:
            return self.entry_rows
        return torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.crow.device), self.crow.diff(), output_size=self.nnz
        )

    def row_sums(self, values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.n_rows, dtype=values.dtype, device=values.device).index_add_(0, self.row_ids(), values)

    def nbytes(self) -> int:
        held = (self.crow, self.col, self.value) + ((self.entry_rows,) if self.entry_rows is not None else ())
        return sum(t.numel() * t.element_size() for t in held)

    def filter_entries(self, keep: torch.Tensor, new_col: Optional[torch.Tensor] = None) -> SparseRows:
        """Only the entries ``keep`` [nnz] (the others are added to the dropped sums); columns renumbered
        by ``new_col`` [old node -> new node] when given. The result keeps its entries' rows (the filtered
        rows are the smaller ones, used many times after)."""
        rows = self.row_ids()
        lost = ~keep
        lost_values = self.value[lost]
        dropped = self.dropped.clone().index_add_(0, rows[lost], lost_values)
        dropped_abs = self.dropped_abs.clone().index_add_(0, rows[lost], lost_values.abs_())
        kept_rows = rows[keep].to(torch.int32)
        crow = torch.zeros_like(self.crow)
        crow[1:] = torch.bincount(kept_rows, minlength=self.n_rows).cumsum(0)
        col = self.col[keep]
        if new_col is not None:
            col = new_col.index_select(0, col).to(torch.int32)
        return SparseRows(
            nodes=self.nodes,
            crow=crow,
            col=col,
            value=self.value[keep],
            bias=self.bias,
            target_value=self.target_value,
            dropped=dropped,
            dropped_abs=dropped_abs,
            total_abs=self.total_abs,
            entry_rows=kept_rows,
        )


class Adjacency:
    """The computed rows as a list of chunks (one per backward batch), never concatenated: the whole
    is as large as the rows themselves, never twice that. Rows are numbered across chunks in order."""

    def __init__(self, chunks: list[SparseRows]):
        self.chunks = chunks

    @property
    def nodes(self) -> torch.Tensor:
        return torch.cat([chunk.nodes for chunk in self.chunks])

    @property
    def n_rows(self) -> int:
        return sum(chunk.n_rows for chunk in self.chunks)

    @property
    def nnz(self) -> int:
        return sum(chunk.nnz for chunk in self.chunks)

    def nbytes(self) -> int:
        return sum(chunk.nbytes() for chunk in self.chunks)

    def cat(self, name: str) -> torch.Tensor:
        """A per-row field of every chunk, concatenated."""
        return torch.cat([getattr(chunk, name) for chunk in self.chunks])

    def normalized(self) -> list[torch.Tensor]:
        """Per chunk [nnz]: |A| with each row divided by its sum (circuit-tracer's normalize_matrix)."""
        out = []
        for chunk in self.chunks:
            magnitude = chunk.value.abs()
            out.append(magnitude / chunk.row_sums(magnitude).clamp(min=1e-10).index_select(0, chunk.row_ids()))
        return out

    def consume(self, fn: Callable[[SparseRows], SparseRows]) -> Adjacency:
        """A new adjacency of ``fn(chunk)`` for every chunk; this one is emptied as it goes, so at most one
        chunk exists twice."""
        mapped = []
        for index in range(len(self.chunks)):
            mapped.append(fn(self.chunks[index]))
            self.chunks[index] = None  # type: ignore[call-overload]
        self.chunks = []
        return Adjacency(mapped)


def sparsify(dense: torch.Tensor, columns: torch.Tensor, drop_mass: float) -> tuple[torch.Tensor, ...]:
    """Dense rows [R, C] (columns: their node indices) -> (crow, col, value, dropped, dropped_abs, total_abs).
    ``dense`` is overwritten.

    Entries are grouped by the power of two of their share of the row's absolute sum; the groups of the
    smallest entries are dropped while their total share stays <= ``drop_mass`` (0: keep every nonzero)."""
    magnitude = dense.abs()
    total = magnitude.sum(1)
    keep = dense != 0
    if drop_mass > 0:
        share = magnitude.div_(total.clamp(min=torch.finfo(dense.dtype).tiny).unsqueeze(1))
        group = torch.frexp(share).exponent.neg_().clamp_(0, 199).long()  # share in [2^-g-1, 2^-g); zeros: 0
        mass = torch.zeros(dense.shape[0], 200, dtype=share.dtype, device=share.device).scatter_add_(1, group, share)
        from_smallest = mass.flip(1).cumsum(1).flip(1)  # [R, g]: share of the entries in groups >= g
        droppable = from_smallest <= drop_mass
        first_dropped = torch.where(droppable.any(1), droppable.int().argmax(1), torch.full_like(group[:, 0], 200))
        keep &= group < first_dropped.unsqueeze(1)
        del share, group
    row, column = torch.nonzero(keep, as_tuple=True)
    value = dense[row, column]
    if drop_mass > 0:
        lost = dense.masked_fill_(keep, 0)  # the caller's rows are not needed any more
        dropped, dropped_abs = lost.sum(1), lost.abs_().sum(1)
    else:
        dropped, dropped_abs = torch.zeros_like(total), torch.zeros_like(total)
    crow = torch.zeros(dense.shape[0] + 1, dtype=torch.long, device=dense.device)
    crow[1:] = torch.bincount(row, minlength=dense.shape[0]).cumsum(0)
    return crow, columns[column].to(torch.int32), value, dropped, dropped_abs, total
