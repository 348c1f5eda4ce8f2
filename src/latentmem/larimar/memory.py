"""The episodic memory of Larimar (Das et al., ICML 2024, section 3; the Kanerva machine's
update): short functions over one memory's matrices, in float64, that mirror the paper.

    M0 [K, C]   the learned prior mean (identity-initialised: eye(K, C))
    Z  [n, C]   written latents, one row per fact (already noised: Z' = Z + xi)
    W  [n, K]   addressing weights
    M  [K, C]   the memory; U [K, K] its row covariance (sequential writing)

Writing an episode in one shot (the release's direct writing): W0 = Z' M0^+, M = W0^+ Z'.
Writing one fact at a time (the Kanerva machine): w = z M^+, Delta = z - w M,
sigma_z = w U w^T + sigma^2 / alpha, c = w U / sigma_z, M += c^T Delta, U -= c^T w U;
alpha = +1 writes, alpha = -1 forgets (the paper's negative-weight update).
Reading: w = z M^+, z_r = w M.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

EXACT_RTOL = 1e-10  # singular values below this share of the largest count as zero (exact pinv)


def pinv_iterative(A: Tensor, steps: int, alpha: float | None = None, tol: float = 1e-13) -> Tensor:
    """The Ben-Israel-Cohen iteration A+ <- 2 A+ - A+ A A+ from alpha * A^T (the release's
    ``_approx_pseudo_inverse``). With alpha < 2 / sigma_max(A)^2 it converges to A^+; singular
    values with alpha * sigma^2 * 2^steps << 1 are treated as zero, so a short run is a
    regularised inverse. alpha None: 1 / (||A||_1 ||A||_inf), which bounds sigma_max^2.

    For a rank-deficient A the iteration doubles rounding noise in the null directions each
    step (measured: 0.8 after 60 steps on a rank-3 8 x 12 matrix), so it stops once the relative
    change falls below ``tol`` (0: run all ``steps``, as the release does) and ends with one
    projection X A X, which removes what noise grew there."""
    if A.numel() == 0:
        return A.new_zeros(A.shape[-1], A.shape[-2])
    if alpha is None:
        a = A.detach().abs()
        bound = float(a.sum(0).max() * a.sum(1).max())
        alpha = 1.0 / bound if bound > 0 else 1.0
    X = alpha * A.transpose(-1, -2)
    m, n = A.shape[-2:]

    def xax(X: Tensor) -> Tensor:  # the cheaper association: (X A) X costs 2 n^2 m, X (A X) 2 m^2 n
        return (X @ A) @ X if n <= m else X @ (A @ X)

    for _ in range(steps):
        new = 2 * X - xax(X)
        done = tol > 0 and float((new - X).norm()) <= tol * float(new.norm())
        X = new
        if done:
            break
    return xax(X) if tol > 0 else X


def pinv_exact(A: Tensor) -> Tensor:
    """torch.linalg.pinv with a fixed relative cut-off (EXACT_RTOL): the SVD route."""
    if A.numel() == 0:
        return A.new_zeros(A.shape[-1], A.shape[-2])
    return torch.linalg.pinv(A, rtol=EXACT_RTOL)


def pinv_fn(method: str, steps: int, alpha: float | None) -> Callable[[Tensor], Tensor]:
    if method == "exact":
        return pinv_exact
    return lambda A: pinv_iterative(A, steps, alpha)


def row_noise(seed: int, injection_id: int, chunk: int, size: int, std: float) -> Tensor:
    """xi for one written row, drawn from a generator keyed by (memory seed, injection, chunk):
    a row's noise does not depend on what else was written, so rewriting a memory without one
    fact reproduces, bit for bit, the memory that never received it."""
    if std == 0:
        return torch.zeros(size, dtype=torch.float64)
    key = hashlib.sha256(f"larimar-noise/{seed}/{injection_id}/{chunk}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))
    return torch.randn(size, generator=g, dtype=torch.float64) * std


def write_oneshot(M0: Tensor, Z: Tensor, pinv: Callable[[Tensor], Tensor], M0_pinv: Tensor | None = None) -> Tensor:
    """One-shot least-squares write of an episode: W0 = Z' M0^+, M = W0^+ Z' (Z given noised).
    An empty episode leaves the prior."""
    if Z.shape[0] == 0:
        return M0.clone()
    W0 = Z @ (pinv(M0) if M0_pinv is None else M0_pinv)
    return pinv(W0) @ Z


def address(z: Tensor, M_pinv: Tensor) -> Tensor:
    """Addressing weights w = z M^+ ([n, C] -> [n, K])."""
    return z @ M_pinv


def read(z: Tensor, M: Tensor, M_pinv: Tensor) -> Tensor:
    """The readout z_r = w M with w = z M^+."""
    return address(z, M_pinv) @ M


def read_recursive(z: Tensor, Z: Tensor, M0: Tensor, pinv: Callable[[Tensor], Tensor], group: int, M0_pinv: Tensor | None = None) -> Tensor:
    """Recursive search for contexts longer than the memory (the paper's context-length
    generalisation): the rows Z [n, C] are split, in writing order, into groups of at most
    ``group`` rows; each group is written one shot into its own memory and read with the query;
    the readouts become the rows of the next level, until one group remains, whose read is the
    answer. Each memory then holds at most ``group`` (<= K) rows, which one-shot writing
    reproduces exactly, where one memory of n > K rows is only a least-squares fit."""
    rows = Z
    while True:
        groups = [rows[i : i + group] for i in range(0, rows.shape[0], group)]
        reads = []
        for g in groups:
            M = write_oneshot(M0, g, pinv, M0_pinv)
            reads.append(read(z, M, pinv(M)))
        if len(groups) == 1:
            return reads[0]
        rows = torch.stack(reads)


def sequential_update(M: Tensor, U: Tensor, w: Tensor, z: Tensor, noise_var: float, alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """The Kanerva-machine update for one row (w [K], z [C]); alpha = -1 removes a row written
    earlier with the same w (the negative-weight forgetting of the paper)."""
    delta = z - w @ M  # [C]
    wU = w @ U  # [K]
    sigma_z = wU @ w + noise_var / alpha
    c = wU / sigma_z
    return M + torch.outer(c, delta), U - torch.outer(c, wU)


def write_sequential(M: Tensor, U: Tensor, Z: Tensor, noise_var: float, pinv: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of Z one at a time, each addressed through the memory as it stands
    (w = z M^+). Returns (M, U, W) with W [n, K] the addressing each row was written with."""
    ws = []
    for z in Z:
        w = address(z, pinv(M))
        M, U = sequential_update(M, U, w, z, noise_var)
        ws.append(w)
    W = torch.stack(ws) if ws else Z.new_zeros(0, M.shape[0])
    return M, U, W
