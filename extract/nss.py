"""BRISQUE natural-scene-statistics features: a weight-free classical backbone (36 values).

Mittal, Moorthy, Bovik, "No-Reference Image Quality Assessment in the Spatial Domain",
IEEE TIP 21(12), 2012. Per scale:

1. Grey level on a 0-255 scale: ITU-R BT.601 luma `0.299 R + 0.587 G + 0.114 B` of
   `image.convert("RGB")`, rounded to whole grey levels as MATLAB's rgb2gray does.
2. MSCN coefficients `(I - mu) / (sigma + C)`, C = 1, where mu and sigma are the local mean and
   standard deviation under a 7x7 Gaussian window with sigma 7/6 (normalised to sum 1; zero
   padding outside the image, as the LIVE release and piq/pyiqa do).
3. A generalised Gaussian (GGD) fit of all MSCN coefficients: (shape, variance).
4. An asymmetric GGD (AGGD) fit of the products of each coefficient with its neighbour in four
   orientations, each (shape, mean, left variance, right variance). The neighbour wraps around
   the image edge (circshift in the release, torch.roll in piq/pyiqa), so every pixel has one.

Both fits use the paper's moment matching: a ratio of sample moments is matched against the
ratio of gamma functions it equals for the model, and the shape is the nearest point of the grid
0.2:0.001:10 (the release's lookup, no interpolation). The AGGD mean is the paper's
eta = (beta_r - beta_l) Gamma(2/nu) / Gamma(1/nu) and the two variances are sigma_l^2, sigma_r^2
(the mean square of the negative, resp. positive, products), which is what the release stores.

Scale 2 repeats all of this on the grey image downsampled to (H // 2, W // 2) by MATLAB's
imresize bicubic with antialiasing (symmetric borders), as the release, piq and pyiqa do.

Checked against piq 0.8.0 and pyiqa 0.1.16 on a reference image set (tests/extract/test_nss.py; docs/backbones.md).

Feature order (index: meaning), scale s in {0, 1} adds 18 * s:
   0 GGD shape, 1 GGD variance of the MSCN coefficients,
   2-5  horizontal products (j, j+1):             AGGD shape, mean, left var, right var,
   6-9  vertical products (i, i+1),
  10-13 main-diagonal products (i, j)(i+1, j+1),
  14-17 secondary-diagonal products (i, j)(i+1, j-1).

A flat image (or any set of coefficients whose mean square is below 1e-12, i.e. nothing but
float rounding) has no distribution to fit: its fits are defined as a Gaussian of zero width,
shape 2 and mean and variances 0, so the features are never NaN.
"""

import numpy as np
from PIL import Image
from scipy.ndimage import correlate1d
from scipy.special import gammaln

NSS_DIM = 36
# Bumped whenever the feature definition changes, so cached NSS stores are seen as stale.
NSS_REVISION = "brisque-live-v2"  # v1: replicate borders, no wrap, interpolated shapes
MSCN_C = 1.0
WINDOW = 7
WINDOW_SIGMA = 7 / 6
MIN_SIDE = 8  # the downsampled scale needs at least 4x4 pixels
FLAT = 1e-12  # mean square below which coefficients count as a flat signal
FLAT_SHAPE = 2.0

# Shape grid of the paper. moment_ratio(shape) = Gamma(2/a)^2 / (Gamma(1/a) Gamma(3/a)) equals
# E[|x|]^2 / E[x^2] for a GGD of that shape; it rises monotonically with the shape.
SHAPES = np.arange(200, 10001) / 1000.0


def moment_ratio(shape: np.ndarray | float) -> np.ndarray:
    a = np.asarray(shape, dtype=np.float64)
    return np.exp(2 * gammaln(2 / a) - gammaln(1 / a) - gammaln(3 / a))


RATIOS = moment_ratio(SHAPES)


def shape_from_ratio(ratio: float) -> float:
    """The grid shape whose moment ratio is nearest `ratio` (the release's lookup)."""
    return float(SHAPES[np.argmin(np.abs(ratio - RATIOS))])


def fit_ggd(x: np.ndarray) -> tuple[float, float]:
    """(shape, variance) of a zero-mean generalised Gaussian by moment matching."""
    x = np.asarray(x, dtype=np.float64).ravel()
    mean_square = float(np.mean(x * x))
    if mean_square < FLAT:
        return FLAT_SHAPE, 0.0
    mean_abs = float(np.mean(np.abs(x)))
    # The release matches the inverse ratio, E[x^2] / E[|x|]^2; the nearest grid point differs.
    return float(SHAPES[np.argmin(np.abs(mean_square / mean_abs**2 - 1 / RATIOS))]), mean_square


def fit_aggd(x: np.ndarray) -> tuple[float, float, float, float]:
    """(shape, mean, left variance, right variance) of an asymmetric GGD by moment matching.

    Lasmar, Moorthy, Bovik (ICIP 2009), as used by BRISQUE: sigma_l^2 and sigma_r^2 are the mean
    squares of the negative and positive samples; the moment ratio corrected for the asymmetry
    gamma = sigma_l / sigma_r gives the shape.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    mean_square = float(np.mean(x * x))
    if mean_square < FLAT:
        return FLAT_SHAPE, 0.0, 0.0, 0.0
    negative, positive = x[x < 0], x[x > 0]
    left_var = float(np.mean(negative**2)) if negative.size else 0.0
    right_var = float(np.mean(positive**2)) if positive.size else 0.0
    sl, sr = np.sqrt(left_var), np.sqrt(right_var)
    ratio = float(np.mean(np.abs(x))) ** 2 / mean_square
    # The paper's R = r (g^3 + 1)(g + 1) / (g^2 + 1)^2 with g = sl / sr, multiplied through by sr^4
    # so that one empty side (sl or sr = 0) stays finite.
    ratio *= (sl**3 + sr**3) * (sl + sr) / (left_var + right_var) ** 2
    shape = shape_from_ratio(ratio)
    # beta = sigma * sqrt(Gamma(1/a) / Gamma(3/a)); mean = (beta_r - beta_l) Gamma(2/a) / Gamma(1/a)
    scale = np.exp(0.5 * (gammaln(1 / shape) - gammaln(3 / shape)))
    mean = (sr - sl) * scale * np.exp(gammaln(2 / shape) - gammaln(1 / shape))
    return shape, float(mean), left_var, right_var


def grey(image: Image.Image) -> np.ndarray:
    """BT.601 luma on the 0-255 scale, float64 (see the module docstring)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    return np.round(rgb @ np.array([0.299, 0.587, 0.114]))


def _gaussian_window() -> np.ndarray:
    taps = np.arange(WINDOW) - WINDOW // 2
    w = np.exp(-(taps**2) / (2 * WINDOW_SIGMA**2))
    return w / w.sum()  # the 7x7 window is the outer product of this with itself


def mscn(luma: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a 0-255 grey image."""
    w = _gaussian_window()

    def blur(x):
        return correlate1d(correlate1d(x, w, axis=0, mode="constant"), w, axis=1, mode="constant")

    mu = blur(luma)
    sigma = np.sqrt(np.abs(blur(luma * luma) - mu * mu))
    return (luma - mu) / (sigma + MSCN_C)


def _neighbour_products(c: np.ndarray) -> list[np.ndarray]:
    """Products with the left, upper, upper-left and lower-left neighbour, wrapping at the edges."""
    return [c * np.roll(c, shift, axis=(0, 1)) for shift in ((0, 1), (1, 0), (1, 1), (-1, 1))]


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's bicubic kernel (a = -0.5)."""
    a = np.abs(x)
    return ((1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1)) + ((-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2)))


def _resize_axis(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """MATLAB imresize along one axis: antialiased bicubic, symmetric borders."""
    n = x.shape[axis]
    scale = out / n
    width = 4 / scale  # the kernel stretched by 1/scale to antialias
    u = (np.arange(1, out + 1) / scale + 0.5 * (1 - 1 / scale))[:, None]
    index = np.floor(u - width / 2) + np.arange(int(np.ceil(width)) + 2)[None, :]
    weights = scale * _cubic(scale * (u - index))
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n), np.arange(n)[::-1]])
    index = mirror[(index.astype(int) - 1) % (2 * n)]
    taken = np.take(x, index, axis=axis)  # axis replaced by (out, taps)
    w = weights.reshape((1,) * axis + weights.shape + (1,) * (x.ndim - axis - 1))
    return (taken * w).sum(axis=axis + 1)


def half_size(luma: np.ndarray) -> np.ndarray:
    h, w = luma.shape
    return _resize_axis(_resize_axis(luma, h // 2, 0), w // 2, 1)


def scale_features(luma: np.ndarray) -> list[float]:
    c = mscn(luma)
    features = list(fit_ggd(c))
    for product in _neighbour_products(c):
        features.extend(fit_aggd(product))
    return features


def nss_features(image: Image.Image) -> np.ndarray:
    """The 36 BRISQUE features of one image, float32, in the order of the module docstring."""
    if min(image.size) < MIN_SIDE:
        raise ValueError(f"NSS features need images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got {image.size}")
    luma = grey(image)
    features = scale_features(luma) + scale_features(half_size(luma))
    return np.asarray(features, dtype=np.float32)
