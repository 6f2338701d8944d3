"""CLIP for FFF_CLIP / CLIP-SIM: parity with a tiny random transformers CLIPModel, folder loading, preprocessing."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dreamvideo_jax.evaluation.clip import (  # noqa: E402
    CLIPScorer,
    PreprocessConfig,
    clip_preprocess,
    load_clip,
)


def _close(ours, ref, rel=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, tol = np.abs(ours - ref).max(), rel * np.abs(ref).max() + 1e-5
    assert err <= tol, f"max|diff| {err:.3g} > tol {tol:.3g}"


def _tiny_clip(act, eos_token_id):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
                         bos_token_id=998, eos_token_id=eos_token_id, pad_token_id=0),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act=act),
        projection_dim=24,
    )  # fmt: skip
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # make every parameter matter (LayerNorms start at 1/0, logit_scale at a constant)
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(1.7)
    return model


def _ids(eos, rng):
    ids = np.zeros((3, 77), np.int64)  # pad 0 after EOT, varying lengths
    for row, n in zip(ids, (5, 12, 40)):
        row[0] = 998
        row[1 : n - 1] = rng.randint(1, 990, n - 2)
        row[n - 1] = eos
    return ids


@pytest.mark.parametrize("act,eos", [("quick_gelu", 999), ("gelu", 2)])
def test_clip_matches_transformers(tmp_path, act, eos):
    ref = _tiny_clip(act, eos)
    rng = np.random.RandomState(0)
    ids = _ids(999 if eos == 2 else eos, rng)  # with the legacy eos id 2, EOT is the highest id (argmax pooling)
    pixels = rng.randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
        img_raw = ref.get_image_features(pixel_values=torch.from_numpy(pixels))
        txt_raw = ref.get_text_features(input_ids=torch.from_numpy(ids))
        img_raw = getattr(img_raw, "pooler_output", img_raw).numpy()
        txt_raw = getattr(txt_raw, "pooler_output", txt_raw).numpy()
    ref.save_pretrained(tmp_path, safe_serialization=True)

    model, params = load_clip(str(tmp_path))
    assert model.eos_token_id == eos and model.vision.patch_size == 8 and model.text.act == act
    import jax

    px = np.transpose(pixels, (0, 2, 3, 1))

    @jax.jit
    def run(p, t, x):
        v = {"params": p}
        return model.apply(v, t, x), model.apply(v, x, method="encode_image"), model.apply(v, t, method="encode_text")

    ours, enc_img, enc_txt = run(params, ids.astype(np.int32), px)
    _close(ours["image_embeds"], out.image_embeds.numpy())
    _close(ours["text_embeds"], out.text_embeds.numpy())
    _close(ours["logits_per_image"], out.logits_per_image.numpy())
    _close(ours["logits_per_text"], out.logits_per_text.numpy())
    _close(enc_img, img_raw)  # unnormalised projections
    _close(enc_txt, txt_raw)


def test_clip_preprocess_matches_transformers_pil_processor():
    from skimage import data
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil()
    for img in (data.astronaut(), data.chelsea(), data.coffee(), data.rocket()):  # square, landscape, portrait...
        for im in (img, np.ascontiguousarray(img.transpose(1, 0, 2))):
            ref = proc(images=im, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            ours = clip_preprocess(im)[0]
            assert ours.shape == (224, 224, 3)
            _close(ours, ref, rel=1e-5)


def test_scorer_fff_clip_and_clip_sim(tmp_path):
    from skimage import data

    ref = _tiny_clip("quick_gelu", 999)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    with open(tmp_path / "preprocessor_config.json", "w") as f:
        json.dump({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 3,
                   "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, f)  # fmt: skip
    scorer = CLIPScorer.from_pretrained(str(tmp_path), tokenizer=None)
    assert scorer.pre == PreprocessConfig(32, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    a, b = data.astronaut(), data.chelsea()[:, :451]
    fff = scorer.fff_clip(np.stack([a, a]), np.stack([a, np.asarray(_resize(b, a.shape[:2]))]))
    assert fff.shape == (2,) and abs(fff[0] - 1.0) < 1e-5 and fff[1] < 1.0 - 1e-4

    # CLIP-SIM = mean over frames of cos(text, frame), checked against transformers directly.
    videos = np.stack([np.stack([a, a[::-1]]), np.stack([a[:, ::-1], a])])  # (2, 2, 512, 512, 3)
    ids = _ids(999, np.random.RandomState(1))[:2].astype(np.int32)
    sim = scorer.clip_sim(videos, ids=ids)
    pix = clip_preprocess(videos.reshape(-1, 512, 512, 3), scorer.pre).transpose(0, 3, 1, 2)
    with torch.no_grad():
        out = ref(input_ids=torch.from_numpy(ids.astype(np.int64)), pixel_values=torch.from_numpy(pix))
    cos = (out.text_embeds.numpy()[:, None] * out.image_embeds.numpy().reshape(2, 2, -1)).sum(-1)
    np.testing.assert_allclose(sim, cos.mean(1), atol=1e-5)


def _resize(img, hw):
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))
