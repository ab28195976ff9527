"""The (epsilon, delta) of one image's upload under the Gaussian mechanism (`ops.gaussian_dp`).

What is released about one image is all its tokens in the payload: the `K` kept tokens of
each of its `M` samples, `K * M` vectors. Adjacency is replace-one: two payloads are
neighbours when the content of one image differs (its count and place in the payload do not;
the manifest shows them). Each token is clipped to L2 norm `clip`, so it moves by at most
`2 clip` when the image changes, and the whole release by at most

    Delta = 2 clip sqrt(K M)   (L2 sensitivity);

noise of std `s = noise_multiplier * clip` is added to every value, so the release is a
Gaussian mechanism with `mu = Delta / s = 2 sqrt(K M) / noise_multiplier`. Which tokens are
kept, their order and each sample's augmentation are drawn from the site's keys and
`config.seed`, never from the pixels, so the bound holds conditional on them (the mechanism
is a data-independent mixture of Gaussian mechanisms of this `mu`). Everything after the
upload (float16 storage, the server's training, the body it returns, the downstream models)
is post-processing and keeps the guarantee. A second upload of the same image composes:
`mu` becomes the root of the sum of the squares.

The tight (epsilon, delta) of a Gaussian mechanism is the closed form of Balle and Wang
(ICML 2018, "Improving the Gaussian mechanism for differential privacy", Theorem 8):

    delta(epsilon) = Phi(mu / 2 - epsilon / mu) - e^epsilon Phi(-mu / 2 - epsilon / mu);

`epsilon(delta)` inverts it by bisection (it decreases in epsilon).

    from smsd_jax.privacy import dp_accountant
    dp_accountant.image_epsilon(1e-5, noise_multiplier=20, tokens=24, samples=2)
"""

from __future__ import annotations

import math

from scipy import special

from smsd_jax.errors import SMSDError

_BISECTIONS = 200


def image_mu(noise_multiplier: float, tokens: int, samples: int) -> float:
    """`mu = 2 sqrt(tokens * samples) / noise_multiplier` of one image's release."""
    if not noise_multiplier > 0:
        raise SMSDError(f"noise_multiplier={noise_multiplier!r}: must be positive (the noise "
                        "std in units of the clip norm)")
    if tokens < 1 or samples < 1:
        raise SMSDError(f"tokens={tokens!r}, samples={samples!r}: an image releases at least "
                        "one token of one sample")
    return 2.0 * math.sqrt(tokens * samples) / noise_multiplier


def _check_mu(mu: float) -> None:
    if not 0 < mu < math.inf:
        raise SMSDError(f"mu={mu!r}: the sensitivity over the noise std must be positive and "
                        "finite")


def _delta(epsilon: float, mu: float) -> float:
    """The closed form; the second term in logs, so that `e^epsilon` cannot overflow."""
    first = special.ndtr(mu / 2 - epsilon / mu)
    second = math.exp(epsilon + special.log_ndtr(-mu / 2 - epsilon / mu))
    return max(float(first - second), 0.0)


def delta(epsilon: float, mu: float) -> float:
    """The smallest delta for which a Gaussian mechanism of `mu` is (epsilon, delta)-DP."""
    _check_mu(mu)
    if not epsilon >= 0:
        raise SMSDError(f"epsilon={epsilon!r}: must be non-negative")
    return _delta(float(epsilon), float(mu))


def epsilon(delta: float, mu: float) -> float:
    """The smallest epsilon for which a Gaussian mechanism of `mu` is (epsilon, delta)-DP.

    Bisection on the closed form; the result errs on the safe side (its delta is at most the
    given one) by under 1e-9 relative.
    """
    _check_mu(mu)
    if not 0 < delta < 1:
        raise SMSDError(f"delta={delta!r}: must be in (0, 1), e.g. 1e-5")
    if _delta(0.0, mu) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while _delta(high, mu) > delta:
        low, high = high, 2 * high
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if _delta(middle, mu) > delta:
            low = middle
        else:
            high = middle
        if high - low <= 1e-9 * high:
            break
    return high


def image_epsilon(delta: float, noise_multiplier: float, tokens: int, samples: int) -> float:
    """Epsilon at `delta` of one image whose `tokens` kept tokens of each of its `samples`
    samples are clipped and noised by `ops.gaussian_dp` with `noise_multiplier`."""
    return epsilon(delta, image_mu(noise_multiplier, tokens, samples))
