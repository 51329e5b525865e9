"""A load-balance model of the CUDA SpMM kernels (csrc/cuda/spmm_kernels.cuh) on an H200.

A model, not a measurement: ``python bench/spmm_balance_model.py`` prints, for the user–item
graphs of bench_spmm.py, the modelled time of one ``A x`` under several designs as a multiple of
the perfectly balanced time. It chose the long-row constants while no GPU was lent (the GPU
benchmarks in bench_spmm.py are the judge).

Model: the gather is latency-bound, so a warp spends one time unit per nonzero, plus ``OVER``
per work item (row or chunk: its row pointers, the first (col, val) load, the store). A block
holds its SM slot until its slowest warp is done (registers are freed per block); 132 SMs, 48
resident warps each (the warp kernel's 32-40 registers), at most 32 resident blocks; blocks
start in index order on the first free slot; kernels run back to back. Balanced: all nonzeros
spread evenly over the 6,336 resident warps.

What it showed (OVER = 16; the ordering held for OVER = 4 and 64), in multiples of balanced:

- one warp per row, no split: 26-72x (the longest rows hold 13.7k-39.9k nonzeros);
- the earlier design (rows past 1,024 nonzeros to one 16-warp block each): 6.0-10.4x;
- chunks, long-row threshold / chunk size 512 / 256: 3.2-6.1x; 256 / 128: 2.7-4.5x;
- the same with 2-warp blocks for the warp kernel (shipped for float): 2.2-3.4x. With 8 rows
  a block, the sum of each block's longest row is 2.3-2.4x the sum of its mean;
- rows taken in descending length order (512 / 256, 8-warp blocks): 1.5-3.2x, but it needs a
  row-order argument, and that extra pointer made ptxas spill in the warp kernel (not shipped;
  see README).
"""

from __future__ import annotations

import heapq

import numpy as np

SMS, WARPS_PER_SM, OVER = 132, 48, 16
MAX_BLOCKS_PER_SM = 32  # sm_80 / sm_90


def makespan(block_times: np.ndarray, blocks_per_sm: int) -> float:
    """Blocks in index order onto the first free of SMS x blocks_per_sm slots."""
    slots = [0.0] * (SMS * blocks_per_sm)
    end = 0.0
    for t in block_times:
        start = heapq.heappop(slots)
        end = max(end, start + t)
        heapq.heappush(slots, start + t)
    return end


def warp_rows(lengths: np.ndarray, max_nnz: float, warps: int = 2) -> float:
    """The warp-per-row kernel, `warps` rows a block (float: 2, double: 8): rows longer than
    max_nnz only cost OVER (left to the chunk kernels)."""
    w = np.where(lengths > max_nnz, OVER, lengths + OVER).astype(float)
    w = np.pad(w, (0, (-len(w)) % warps))
    per_sm = min(WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)
    return makespan(w.reshape(-1, warps).max(1), per_sm)


def block_per_long_row(lengths: np.ndarray, long_row: int = 1024, warps: int = 16) -> float:
    """The earlier design: one 512-thread block per 512 rows takes their long rows one after
    another, 16 warps a row; 2 such blocks per SM (64 registers x 512 threads)."""
    per_row = np.where(lengths > long_row, np.ceil(lengths / warps) + OVER, 0)
    groups = np.add.reduceat(per_row, np.arange(0, len(lengths), 512))
    return warp_rows(lengths, long_row, 8) + makespan(groups + OVER, 2)


def chunked(lengths: np.ndarray, long_row: int, chunk: int, warps: int = 2,
            sort: bool = False) -> float:
    """The shipped design: the warp kernel for rows up to long_row, then a warp per chunk of
    the longer rows (8-warp blocks, grid-stride over at most 1024 blocks, 4 per SM), then the
    chunk sum."""
    rows = np.sort(lengths)[::-1] if sort else lengths
    longs = lengths[lengths > long_row]
    sizes = (np.concatenate([np.minimum(chunk, n - chunk * np.arange(-(-n // chunk)))
                             for n in longs]) if len(longs) else np.zeros(0))
    nnz = int(lengths.sum())
    blocks = min(-(-(nnz // chunk + nnz // (long_row + 1)) // 8), 1024)
    per_warp = np.zeros(blocks * 8)
    np.add.at(per_warp, np.arange(len(sizes)) % len(per_warp), sizes + OVER)
    chunks = makespan(per_warp.reshape(-1, 8).max(1) + OVER, 4)
    return warp_rows(rows, long_row, warps) + chunks + 4 * OVER  # + the list and the chunk sum


def main() -> None:
    from bench_spmm import SHAPES, user_item_graph

    for shape in SHAPES:
        _, a = user_item_graph(shape)
        lengths = np.diff(a.indptr).astype(np.int64)
        balanced = lengths.sum() / (SMS * WARPS_PER_SM) + OVER
        designs = {
            "warp per row": warp_rows(lengths, np.inf, 8),
            "16-warp block past 1024": block_per_long_row(lengths),
            "chunks 512/256": chunked(lengths, 512, 256, 8),
            "chunks 256/128": chunked(lengths, 256, 128, 8),
            "chunks 256/128, 2-warp blocks": chunked(lengths, 256, 128, 2),
            "chunks 512/256, rows sorted": chunked(lengths, 512, 256, 8, sort=True),
        }
        print(f"{shape}: " + ", ".join(f"{k} {v / balanced:.2f}x" for k, v in designs.items()))


if __name__ == "__main__":
    main()
