"""mmfast.analysis: the modality gap on synthetic embeddings whose gap, cosines and separability are known exactly,
the shift along the gap, bad input, and a smoke run of examples/modality_gap.py."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmfast.analysis import linear_separability, modality_gap, shift_embeddings

D, A = 64, 0.6  # each row is A * (its modality's axis) + B * (a unit vector orthogonal to both axes)
B = math.sqrt(1 - A * A)


def cone(n, axis, seed, paired=True):
    """n unit rows A*e_axis + B*u_i, the u_i unit vectors orthogonal to e_0 and e_1. paired: the u_i come in +/-
    pairs, so the centroid is A*e_axis exactly and the mean cosine between two different rows is A^2 - B^2/(n-1)
    exactly (but a held-out -u mirrors a trained u: no chance level). Otherwise the u_i are independent."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n // 2 if paired else n, D, generator=g, dtype=torch.float64)
    u[:, :2] = 0
    u = torch.nn.functional.normalize(u, dim=-1)
    rows = B * (torch.cat([u, -u]) if paired else u)
    rows[:, axis] += A
    return rows[torch.randperm(n, generator=g)]


def test_known_gap():
    n, m = 200, 120
    image, text = cone(n, 0, seed=1), cone(m, 1, seed=2)
    result = modality_gap(image.float(), text.float())
    expected = torch.zeros(D, dtype=torch.float64)
    expected[0], expected[1] = A, -A
    torch.testing.assert_close(result.gap, expected, rtol=0, atol=1e-6)  # fp32 input rounding
    assert result.gap_norm == pytest.approx(A * math.sqrt(2), abs=1e-6)
    assert result.image_cosine == pytest.approx(A * A - B * B / (n - 1), abs=1e-6)
    assert result.text_cosine == pytest.approx(A * A - B * B / (m - 1), abs=1e-6)
    assert result.cross_cosine == pytest.approx(0.0, abs=1e-6)  # A^2 e_0 . e_1
    assert result.separability == 1.0
    assert result.n_train == 100 + 60


def test_no_gap_is_chance():
    image, text = cone(400, 0, seed=3, paired=False), cone(400, 0, seed=4, paired=False)  # one distribution
    result = modality_gap(image, text)
    # each centroid is A*e_0 plus noise of norm ~B/sqrt(400) = 0.04: the gap's norm is ~0.057
    assert result.gap_norm < 0.1, result.gap_norm
    assert result.cross_cosine == pytest.approx(A * A, abs=0.01)
    # 400 held-out rows: chance is 0.5 +- 0.025 (one standard deviation)
    assert abs(result.separability - 0.5) < 0.1, result.separability


def test_separability_is_deterministic_and_held_out():
    image, text = cone(100, 0, seed=5, paired=False), cone(100, 0, seed=6, paired=False)
    first = linear_separability(image, text, seed=7)
    assert linear_separability(image, text, seed=7) == first
    # More rows to train on, 40 held out: still chance, within 0.2 (2.5 standard deviations)
    assert abs(linear_separability(image, text, seed=7, train_fraction=0.8)[0] - 0.5) < 0.2


def test_scale_does_not_matter():
    image, text = cone(50, 0, seed=8), cone(50, 1, seed=9)
    a = modality_gap(image, text)
    b = modality_gap(image * torch.linspace(0.1, 10, 50)[:, None].double(), text * 3)
    torch.testing.assert_close(a.gap, b.gap)
    assert a.separability == b.separability


def test_shift_closes_the_gap():
    image, text = cone(100, 0, seed=10), cone(100, 1, seed=11)
    gap = modality_gap(image, text).gap
    # alpha = 1 puts both centroids on (A/2)(e_0 + e_1) before renormalizing; every row has the same norm
    # sqrt(A^2/2 + B^2) then, so the renormalized centroids coincide: no gap left.
    shifted_image, shifted_text = shift_embeddings(image, text, gap, 1.0)
    assert modality_gap(shifted_image, shifted_text).gap_norm < 1e-12
    torch.testing.assert_close(shifted_image.norm(dim=-1), torch.ones(100, dtype=torch.float64))
    # alpha = 0: only the normalization; a negative alpha widens the gap
    same_image, _ = shift_embeddings(image * 2, text, gap, 0.0)
    torch.testing.assert_close(same_image, image)
    assert modality_gap(*shift_embeddings(image, text, gap, -0.5)).gap_norm > A * math.sqrt(2)
    # the paper's formula, row by row
    alpha = 0.3
    expected = torch.nn.functional.normalize(image - alpha / 2 * gap, dim=-1)
    torch.testing.assert_close(shift_embeddings(image, text, gap, alpha)[0], expected)
    # the inputs' dtypes are kept
    out = shift_embeddings(image.bfloat16(), text.float(), gap, alpha)
    assert (out[0].dtype, out[1].dtype) == (torch.bfloat16, torch.float32)


def test_bad_input():
    good = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"image_emb must be 2-D \[rows, D\], got shape \(8, 16, 1\)"):
        modality_gap(good[..., None], good)
    with pytest.raises(ValueError, match=r"text_emb must be 2-D"):
        modality_gap(good, good[0])
    with pytest.raises(ValueError, match="embedding size mismatch: image_emb has D=16.*text_emb has D=15"):
        modality_gap(good, good[:, :15])
    with pytest.raises(ValueError, match="text_emb needs at least 4 rows, got 3"):
        modality_gap(good, good[:3])
    with pytest.raises(TypeError, match="image_emb must be a floating tensor"):
        modality_gap(good.long(), good)
    with pytest.raises(TypeError, match="text_emb must be a torch.Tensor"):
        modality_gap(good, good.tolist())
    with pytest.raises(ValueError, match="image_emb has non-finite values"):
        modality_gap(torch.cat([good[:7], torch.full((1, 16), math.nan)]), good)
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\)"):
        modality_gap(good, good, train_fraction=1.0)
    with pytest.raises(ValueError, match=r"gap must be a 1-D tensor of size D=16.*\(15,\)"):
        shift_embeddings(good, good, torch.zeros(15), 0.5)
    with pytest.raises(ValueError, match="gap has non-finite values"):
        shift_embeddings(good, good, torch.full((16,), math.inf), 0.5)
    with pytest.raises(ValueError, match="alpha must be a finite float"):
        shift_embeddings(good, good, torch.zeros(16), math.nan)


def test_lazy_attribute():
    import mmfast

    assert mmfast.analysis.modality_gap is modality_gap


def test_example_smoke(tmp_path):
    """examples/modality_gap.py on synthetic embeddings writes its PNG."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gap.png"
    proc = subprocess.run([sys.executable, str(root / "examples" / "modality_gap.py"), "--synthetic", "--n", "64",
                           "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "gap norm" in proc.stdout and "zero-shot top-1" in proc.stdout
