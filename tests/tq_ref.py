"""Independent numpy implementation of TurboQuant (the test oracle for tq.c).

Written from the paper -- Zandieh, Daliri, Hadian, Mirrokni, "TurboQuant: Online Vector
Quantization with Near-optimal Distortion Rate", arXiv 2504.19874 (sections 3.1 and 3.2) --
and from the byte layout documented in tq.h, not from tq.c. Everything is float64. The
codec's random choices (the rotation Pi and the QJL matrix S) are inputs, so that codes can
be compared with tq.c's bit for bit; `haar_rotation` and `gaussian_qjl` draw independent
ones for predictions that share nothing with tq.c.

    Algorithm 1 (TurboQuant_mse): u = x/|x|, y = Pi u, idx_i = argmin_k |y_i - c_k|,
        x~ = s Pi^T c[idx], with c the Lloyd-Max codebook of the coordinate density
        f(t) = Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2)) (1 - t^2)^((d-3)/2).
    Algorithm 2 (TurboQuant_prod): Algorithm 1 at b-1 bits, r = x - x~_mse,
        qjl = sign(S r), gamma = |r|, x~ = x~_mse + sqrt(pi/2)/d gamma S^T qjl.
        (tq.h: S acts on the rotated residual Pi r.)
    Scale rules for s: "norm" |x| (the paper), "nc" |x|/|c|, "eden" |x|/<y, c>.
"""
import functools
import math

import numpy as np

F16_MAX = 65504.0
MSE_BITS = {"tq2": 2, "tq3": 3, "tq4": 4, "tq2p": 1, "tq3p": 2, "tq4p": 3}   # Lloyd-Max bits


# ---- the Lloyd-Max codebook ------------------------------------------------------------

_GL_T, _GL_W = np.polynomial.legendre.leggauss(24)


def _density_log_norm(d):
    """log of the normalizing constant Gamma(d/2) / (sqrt(pi) Gamma((d-1)/2))."""
    return math.lgamma(d / 2) - 0.5 * math.log(math.pi) - math.lgamma((d - 1) / 2)


def _cell_integrals(lo, hi, d, powers, centers=None, nsub=24):
    """Integrals of f(t) * t^p (or (t - centers)^p) over the cells [lo_k, hi_k], by
    Gauss-Legendre on nsub equal pieces of every cell. Returns an array (len(powers), K)."""
    edges = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, nsub + 1)[None, :]
    a, b = edges[:, :-1, None], edges[:, 1:, None]
    t = (a + b) / 2 + (b - a) / 2 * _GL_T                    # (K, nsub, nodes)
    w = (b - a) / 2 * _GL_W
    f = np.exp(_density_log_norm(d) + (d - 3) / 2 * np.log1p(-t * t))
    x = t if centers is None else t - centers[:, None, None]
    return np.array([(w * f * x ** p).sum(axis=(1, 2)) for p in powers])


@functools.lru_cache(maxsize=None)
def lloyd_max(d, bits, tol=1e-13, max_iter=100000):
    """Centroids (2^bits,) of the exact-density Lloyd-Max quantizer, by Lloyd's iteration:
    cells from midpoints, centroids = conditional means E[t | cell]."""
    K = 2 ** bits
    c = np.linspace(-2.0, 2.0, K) / math.sqrt(d)             # any increasing start works
    for _ in range(max_iter):
        edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
        m0, m1 = _cell_integrals(edges[:-1], edges[1:], d, (0, 1))
        new = m1 / m0
        done = np.max(np.abs(new - c)) * math.sqrt(d) < tol
        c = new
        if done:
            break
    c = (c - c[::-1]) / 2                                    # the density is even
    return c


def codebook_mse(c, d):
    """d * E[(t - Q(t))^2]: the MSE of a unit vector quantized with codebook c."""
    edges = np.concatenate([[-1.0], (c[1:] + c[:-1]) / 2, [1.0]])
    (m2,) = _cell_integrals(edges[:-1], edges[1:], d, (2,), centers=c)
    return d * m2.sum()


# ---- rotations and QJL matrices ------------------------------------------------------------

def hadamard(d):
    """Walsh-Hadamard matrix in Sylvester order, normalized: H[i, j] = (-1)^popcount(i&j)/sqrt(d)."""
    H = np.ones((1, 1))
    while H.shape[0] < d:
        H = np.block([[H, H], [H, -H]])
    return H / math.sqrt(d)


def hadamard_rotation(signs):
    """Pi = H D_R ... H D_2 H D_1 for signs of shape (R, d) (tq.h)."""
    d = signs.shape[1]
    H, Pi = hadamard(d), np.eye(d)
    for s in signs:
        Pi = H @ (s[:, None] * Pi)
    return Pi


def haar_rotation(d, rng):
    """A Haar-random orthogonal matrix: the Q of a QR of a Gaussian matrix with R's
    diagonal positive, i.e. Gram-Schmidt on its rows (done twice for accuracy)."""
    A = rng.standard_normal((d, d))
    Q = np.zeros((d, d))
    for i in range(d):
        v = A[i] - Q[:i].T @ (Q[:i] @ A[i])
        v -= Q[:i].T @ (Q[:i] @ v)
        Q[i] = v / np.linalg.norm(v)
    return Q


def gaussian_qjl(d, rng):
    return rng.standard_normal((d, d))


# ---- fp16 and bit packing (tq.h's byte layout) ------------------------------------------------

def fp16(v):
    """Stored scale: float64 -> nearest fp16, saturated at 65504 (tq.h)."""
    return np.minimum(np.asarray(v, dtype=np.float64), F16_MAX).astype(np.float16)


def fp16_ambiguous(v, rel=2e-6):
    """True where v is so close to a rounding midpoint that float32 arithmetic may round it
    to the other fp16 neighbour."""
    v = np.asarray(v, dtype=np.float64)
    return fp16(v * (1 - rel)) != fp16(v * (1 + rel))


def pack_bits(idx, bits):
    """(n, d) indices -> (n, d*bits/8) bytes: index i at bits [bits*i, bits*i + bits) of a
    little-endian bit stream (bit k of the stream = bit k%8 of byte k/8)."""
    stream = (idx[:, :, None] >> np.arange(bits)) & 1
    return np.packbits(stream.reshape(len(idx), -1).astype(np.uint8), axis=1, bitorder="little")


def unpack_bits(data, d, bits):
    stream = np.unpackbits(data, axis=1, bitorder="little")[:, : d * bits].reshape(len(data), d, bits)
    return (stream.astype(np.int64) << np.arange(bits)).sum(axis=2)


def f16_bytes(h):
    return np.ascontiguousarray(h.astype("<f2")).view(np.uint8).reshape(len(h), 2)


# ---- TurboQuant ------------------------------------------------------------------------------

class TurboQuant:
    """TurboQuant_mse (fmt tq2/tq3/tq4) or TurboQuant_prod (tq2p/tq3p/tq4p) for one d."""

    def __init__(self, fmt, d, scale, Pi, S=None):
        self.fmt, self.d, self.scale = fmt, d, scale
        self.prod = fmt.endswith("p")
        self.bits = MSE_BITS[fmt]
        self.c = lloyd_max(d, self.bits)
        self.Pi = Pi
        self.S = S

    def encode(self, X):
        """X (n, d) -> (codes (n, bytes) uint8, ambiguous (n,) bool). A vector is ambiguous
        when a float32 computation (tq.c's rotated coordinates are within ~1e-6/sqrt(d) of
        exact) might decide one of its bits differently: a coordinate within 3e-6/sqrt(d)
        of a decision bound, a scale within 2e-6 (relative) of an fp16 rounding midpoint,
        a QJL projection within 2e-5 |r| of zero."""
        d, c = self.d, self.c
        norm = np.linalg.norm(X, axis=1)
        U = X / np.where(norm > 0, norm, 1)[:, None]
        Y = U @ self.Pi.T                                          # y = Pi u
        bounds = (c[1:] + c[:-1]) / 2                              # cells of the nearest centroid
        idx = np.searchsorted(bounds, Y)                           # (a tie goes to the lower cell)
        C = c[idx]
        if self.scale == "norm":
            s = norm
        elif self.scale == "nc":
            s = norm / np.linalg.norm(C, axis=1)
        else:
            s = norm / np.maximum(np.einsum("ij,ij->i", Y, C), 1e-300)   # <y, c> > 0 unless x = 0
        s16 = fp16(np.where(norm > 0, s, 0.0))                     # x = 0: s = 0, x~ = 0
        near = np.minimum(np.abs(Y - bounds[np.maximum(idx - 1, 0)]), np.abs(Y - bounds[np.minimum(idx, len(bounds) - 1)]))
        ambiguous = (near.min(axis=1) < 3e-6 / math.sqrt(d)) | fp16_ambiguous(s)
        parts = [pack_bits(idx, self.bits)]
        if self.prod:
            R = norm[:, None] * Y - s16.astype(np.float64)[:, None] * C    # Pi r, rotated residual
            Z = R @ self.S.T
            gamma = np.linalg.norm(R, axis=1)
            ambiguous |= (np.abs(Z) < 2e-5 * gamma[:, None]).any(axis=1) | fp16_ambiguous(gamma)
            parts += [pack_bits((Z > 0).astype(np.int64), 1), f16_bytes(s16), f16_bytes(fp16(gamma))]
        else:
            parts += [f16_bytes(s16)]
        return np.concatenate(parts, axis=1), ambiguous & (norm > 0)

    def decode(self, codes):
        """codes (n, bytes) -> X~ (n, d) = Pi^T (s c[idx] + sqrt(pi/2)/d gamma S^T qjl)."""
        d, b = self.d, self.bits
        nb = d * b // 8
        idx = unpack_bits(codes[:, :nb], d, b)
        if self.prod:
            qjl = 2.0 * unpack_bits(codes[:, nb:nb + d // 8], d, 1) - 1
            tail = codes[:, nb + d // 8:]
        else:
            tail = codes[:, nb:]
        half = np.ascontiguousarray(tail).view("<f2").astype(np.float64)   # s (, gamma)
        Yt = half[:, :1] * self.c[idx]
        if self.prod:
            Yt = Yt + math.sqrt(math.pi / 2) / d * half[:, 1:2] * (qjl @ self.S)
        return Yt @ self.Pi
