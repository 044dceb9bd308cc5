"""Pieces -> one landing: the symbolic path and the element-by-element path agree, in chunks of any size."""

from __future__ import annotations

import pytest

from ipcbridge.errors import MappingError
from ipcbridge.mapping import pieces as P
from ipcbridge.mapping.derived import Landing
from ipcbridge.mapping.pieces import AffinePiece, ExplicitPiece, landing


def _explicit(p: AffinePiece) -> ExplicitPiece:
    return ExplicitPiece(p.target, P.affine_values(p.src_offset, p.src_stride, p.shape),
                         P.affine_values(p.dst_offset, p.dst_stride, p.shape))


CASES = {
    # HF [4, 3] copied whole into rows 2..6 of a [8, 3] parameter
    "rows": ((4, 3), [AffinePiece("t", (4, 3), 0, (3, 1), 6, (3, 1))], Landing("x", "t", 6, (4, 3), (3, 1))),
    # HF [4, 3] copied transposed (GPT-2's Conv1D): param [3, 4]
    "transposed": ((4, 3), [AffinePiece("t", (3, 4), 0, (1, 3), 0, (4, 1))], Landing("x", "t", 0, (4, 3), (1, 4))),
    # HF [2, 4, 3] (experts, 2I, H) copied per expert and half, as vLLM's w13 loader does
    "experts": ((2, 4, 3), [AffinePiece("t", (2, 3), e * 12 + h * 6, (3, 1), e * 12 + h * 6, (3, 1))
                            for e in range(2) for h in range(2)], Landing("x", "t", 0, (2, 4, 3), (12, 3, 1))),
    # one flat walk across rows: not one HF dimension, so checked element by element
    "flat-walk": ((4, 3), [AffinePiece("t", (12,), 0, (1,), 0, (1,))], Landing("x", "t", 0, (4, 3), (3, 1))),
}


@pytest.mark.parametrize("chunk", [P.CHUNK, 5, 1])
@pytest.mark.parametrize("case", list(CASES))
def test_symbolic_and_explicit_pieces_give_one_landing(case: str, chunk: int, monkeypatch) -> None:
    monkeypatch.setattr(P, "CHUNK", chunk)
    shape, pieces, want = CASES[case]
    assert landing("x", shape, pieces) == want
    assert landing("x", shape, [_explicit(p) for p in pieces]) == want
    assert landing("x", shape, pieces[::-1]) == want  # the loader's order does not matter


def test_a_permutation_is_refused_on_both_paths() -> None:
    swapped = [AffinePiece("t", (2, 3), 0, (3, 1), 6, (3, 1)), AffinePiece("t", (2, 3), 6, (3, 1), 0, (3, 1))]
    for pieces in (swapped, [_explicit(p) for p in swapped]):
        with pytest.raises(MappingError, match="permutation"):
            landing("x", (4, 3), pieces)


def test_two_parameters_and_nothing_are_refused() -> None:
    with pytest.raises(MappingError, match="splits it over"):
        landing("x", (4,), [AffinePiece("a", (2,), 0, (1,), 0, (1,)), AffinePiece("b", (2,), 2, (1,), 0, (1,))])
    with pytest.raises(MappingError, match="did not copy it"):
        landing("x", (4,), [])


def test_dst_of_solves_an_injective_piece() -> None:
    p = AffinePiece("t", (3, 4), 0, (1, 3), 10, (4, 1))  # HF [4, 3] transposed into param rows
    assert [p.dst_of(f) for f in (0, 1, 3, 11)] == [10, 14, 11, 10 + 2 * 4 + 3]
    assert p.dst_of(12) is None and p.dst_of(-1) is None
