"""Correctness of the speed modules (decode cache, frozen-prefix feature cache, patch dropout).
Speed itself is measured by benchmarks/, never asserted here."""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

from vitft_app.data import ImageDataset, build_transforms, collate_skipping_failures, processor_spec, scan_dataset
from vitft_app.decode_cache import (
    CachedImageDataset,
    DecodeCache,
    ThroughPil,
    decode_to_uint8,
    decoded_recipe,
    recipe_from_spec,
    tensor_transform,
)
from vitft_app.feature_cache import cache_features, split_frozen_model
from vitft_app.modeling import freeze_layers


@pytest.fixture
def photos(tmp_path):
    """Two classes of RGB JPEGs and PNGs of odd sizes (so resize and crop really work)."""
    root = tmp_path / "photos"
    gen = torch.Generator().manual_seed(0)
    for c, name in enumerate(("ants", "bees")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            w, h = 61 + 13 * i, 47 + 7 * i + c
            pixels = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
            ext = "jpg" if i % 2 else "png"
            Image.fromarray(pixels).save(root / name / f"{i}.{ext}")
    return root


def _items(root):
    return scan_dataset(root, val_fraction=0.25, seed=0, cache=None).train


@pytest.mark.parametrize("processor", [
    ViTImageProcessor(size={"height": 32, "width": 32}),
    ViTImageProcessor(size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3),
])
def test_cached_dataset_matches_image_dataset_exactly(photos, tmp_path, processor):
    items = _items(photos)
    spec = processor_spec(processor)
    out_h, out_w = spec.output_size
    reference = ImageDataset(items, build_transforms(processor, train=False), (out_w, out_h))
    cache = DecodeCache(tmp_path / "cache", memory_budget_bytes=10**9)
    cached = CachedImageDataset(items, cache, recipe_from_spec(spec), tensor_transform(spec))
    for epoch in range(2):
        for i in range(len(items)):
            (a, la), (b, lb) = reference[i], cached[i]
            assert la == lb and a.dtype == b.dtype == torch.float32
            assert torch.equal(a, b), f"item {i} differs in epoch {epoch}"
    assert cache.misses == len(items) and cache.hits == len(items)


def test_memory_tier_packs_entries_into_shared_slabs(photos, tmp_path):
    """Memory-tier entries are views of one large slab (no per-image heap allocation left behind),
    equal to a fresh decode; clear() drops the slabs."""
    from vitft_app.decode_cache import _SlabStore, decode_to_uint8

    items = _items(photos)
    recipe = recipe_from_spec(processor_spec(ViTImageProcessor(size={"height": 32, "width": 32})))
    cache = DecodeCache(tmp_path / "cache")
    entries = [cache.get(item.path, recipe) for item in items]
    storages = {e.untyped_storage().data_ptr() for e in entries}
    assert len(storages) == 1 and cache._slabs.reserved_bytes == 64 * 1024**2
    assert all(torch.equal(e, decode_to_uint8(item.path, recipe)) for e, item in zip(entries, items))
    cache.clear()
    assert cache._slabs.reserved_bytes == 0 and cache.memory_bytes == 0
    small = _SlabStore(slab_bytes=100)
    a, b = small.store(torch.ones(60, dtype=torch.uint8)), small.store(torch.full((60,), 2, dtype=torch.uint8))
    big = small.store(torch.zeros(101, dtype=torch.uint8))
    assert small.reserved_bytes == 200 and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    assert big.numel() == 101 and (a == 1).all() and (b == 2).all()


def test_budget_spills_to_disk_and_reloads(photos, tmp_path):
    items = _items(photos)
    recipe = recipe_from_spec(processor_spec(ViTImageProcessor(size={"height": 32, "width": 32})))
    entry = 3 * 32 * 32
    cache = DecodeCache(tmp_path / "cache", memory_budget_bytes=2 * entry)
    first = [cache.get(item.path, recipe).clone() for item in items]
    assert cache.memory_bytes == 2 * entry and cache.spilled == len(items) - 2
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == len(items) - 2
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
    again = [cache.get(item.path, recipe) for item in items]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert cache.misses == len(items) and cache.hits == len(items)
    # a second cache (another process, a later run) finds the disk tier
    other = DecodeCache(tmp_path / "cache", memory_budget_bytes=0)
    assert torch.equal(other.get(items[-1].path, recipe), first[-1]) and other.misses == 0


def test_changed_file_or_size_is_a_miss(photos, tmp_path):
    item = _items(photos)[0]
    spec = processor_spec(ViTImageProcessor(size={"height": 32, "width": 32}))
    cache = DecodeCache(tmp_path / "cache", memory_budget_bytes=0)
    recipe = recipe_from_spec(spec)
    before = cache.get(item.path, recipe).clone()
    Image.new("RGB", (50, 40), (10, 200, 30)).save(item.path, format=Image.open(item.path).format)
    os.utime(item.path, ns=(1, 1))  # a different mtime for certain
    after = cache.get(item.path, recipe)
    assert cache.misses == 2 and not torch.equal(before, after)
    assert torch.equal(after, decode_to_uint8(item.path, recipe))
    bigger = recipe_from_spec(processor_spec(ViTImageProcessor(size={"height": 48, "width": 48})))
    assert cache.get(item.path, bigger).shape == (3, 48, 48) and cache.misses == 3


def test_augment_recipe_keeps_aspect_and_random_crop_gives_model_size(photos, tmp_path):
    items = _items(photos)
    spec = processor_spec(ViTImageProcessor(size={"height": 32, "width": 32}))
    recipe = recipe_from_spec(spec, augment="basic")
    assert recipe.resize == 37 and recipe.crop is None  # ceil(32 / 0.875)
    cache = DecodeCache(None)
    dataset = CachedImageDataset(items, cache, recipe, tensor_transform(spec, train=True, augment="basic"))
    torch.manual_seed(0)
    x, _ = dataset[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    stored = cache.get(items[0].path, recipe)
    assert min(stored.shape[1:]) == 37 and stored.dtype == torch.uint8


@pytest.mark.parametrize("augment", ["basic", "randaugment"])
def test_augmented_training_from_decoded_images_matches_decoding_each_time(photos, tmp_path, augment):
    """The training split's decoded images (JPEG draft included) are cached, not resized; the random
    transforms on them give the same tensors bit for bit, with the same random draws, epoch after
    epoch; what does not fit the memory budget is decoded again, never written to disk."""
    big = photos / "bees" / "big.jpg"
    gen = torch.Generator().manual_seed(1)
    Image.fromarray((torch.rand(260, 300, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(big)
    items = _items(photos)
    items = [*items, dataclasses.replace(items[0], path=str(big))]
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    transform = build_transforms(processor, True, augment)
    draft = (64, 64)
    recipe = decoded_recipe(draft)
    assert recipe.spill is False and recipe.resize is None
    stored = DecodeCache(tmp_path / "all").get(str(big), recipe)
    assert tuple(stored.shape) == (65, 75, 3)  # decoded at 1/4 scale by the JPEG draft, kept as PIL lays it out
    budget = 3 * 70 * 80 * 2  # room for a few small images only
    cache = DecodeCache(tmp_path / "cache", memory_budget_bytes=budget)
    reference = ImageDataset(items, transform, draft)
    cached = CachedImageDataset(items, cache, recipe, ThroughPil(transform))
    for epoch in range(2):
        torch.manual_seed(epoch)
        expected = [reference[i] for i in range(len(items))]
        torch.manual_seed(epoch)
        got = [cached[i] for i in range(len(items))]
        for (a, la), (b, lb) in zip(expected, got):
            assert la == lb and a.shape == b.shape == (3, 32, 32) and torch.equal(a, b)
    assert 0 < cache.memory_bytes <= budget and cache.hits > 0
    assert cache.misses > len(items)  # what did not fit was decoded again in epoch 2
    assert not (tmp_path / "cache").exists()  # nothing spilled


def test_threads_share_one_cache(photos, tmp_path):
    items = _items(photos) * 8
    recipe = recipe_from_spec(processor_spec(ViTImageProcessor(size={"height": 32, "width": 32})))
    cache = DecodeCache(tmp_path / "cache", memory_budget_bytes=3 * 3 * 32 * 32)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda it: cache.get(it.path, recipe), items))
    expected = {it.path: decode_to_uint8(it.path, recipe) for it in items}
    assert all(torch.equal(r, expected[it.path]) for r, it in zip(results, items))
    assert cache.memory_bytes <= 3 * 3 * 32 * 32 and len(cache) == len(expected)


def test_broken_file_yields_none_and_collate_drops_it(photos, tmp_path):
    items = _items(photos)
    with open(items[0].path, "wb") as handle:
        handle.write(b"not an image at all")
    spec = processor_spec(ViTImageProcessor(size={"height": 32, "width": 32}))
    dataset = CachedImageDataset(items, DecodeCache(tmp_path / "c"), recipe_from_spec(spec), tensor_transform(spec))
    assert dataset[0] is None
    batch = collate_skipping_failures([dataset[i] for i in range(len(items))])
    assert batch["pixel_values"].shape[0] == len(items) - 1 and int(batch["failed"]) == 1


# ---- frozen-prefix feature cache ----------------------------------------------------------------


def _vit(layers=4, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, num_labels=3, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout)
    return ViTForImageClassification(config).eval()


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_cached_path_logits_equal_full_model(depth):
    model = _vit()
    freeze_layers(model, depth)
    prefix, suffix = split_frozen_model(model, depth)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(pixel_values=x).logits
        cached = suffix(prefix(x))
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-5)
    features = prefix(x)
    assert features.shape == ((5, 32) if depth == 4 else (5, 17, 32))
    trainable_model = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in suffix.parameters() if p.requires_grad} == trainable_model


def test_split_refuses_unfrozen_prefix_and_bad_depth():
    model = _vit()
    with pytest.raises(ValueError, match="frozen"):
        split_frozen_model(model, 2)
    freeze_layers(model, 2)
    with pytest.raises(ValueError, match="between 1 and 4"):
        split_frozen_model(model, 0)


@pytest.mark.parametrize("spill", [False, True])
def test_cache_features_of_a_dataset_and_training_the_suffix(photos, tmp_path, spill):
    items = _items(photos)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    dataset = ImageDataset(items, build_transforms(processor, train=False), (32, 32))
    model = _vit()
    freeze_layers(model, 2)
    prefix, suffix = split_frozen_model(model, 2)
    store = cache_features(prefix, dataset, batch_size=3, memory_budget_bytes=0 if spill else 10**9,
                           spill_dir=tmp_path / "spill" if spill else None)
    assert len(store) == len(items) and store.features.shape == (len(items), 17, 32)
    assert not store.features.requires_grad
    pixels = torch.stack([dataset[i][0] for i in range(len(items))])
    with torch.no_grad():
        full = model(pixel_values=pixels).logits
    batch = store.take(range(len(items)))
    torch.testing.assert_close(suffix(batch["features"]), full, rtol=0, atol=1e-5)
    assert batch["labels"].tolist() == [item.label for item in items]
    # the suffix trains the model's own parameters (save_pretrained then saves the result)
    before = model.classifier.weight.detach().clone()
    frozen_before = model.vit.layers[0].mlp.fc1.weight.detach().clone() if hasattr(model.vit, "layers") else None
    optimizer = torch.optim.AdamW([p for p in suffix.parameters() if p.requires_grad], lr=1e-2)
    for batch in store.batches(4):
        loss = torch.nn.functional.cross_entropy(suffix(batch["features"]), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(before, model.classifier.weight)
    if frozen_before is not None:
        assert torch.equal(frozen_before, model.vit.layers[0].mlp.fc1.weight)


def test_broken_image_is_skipped_by_the_feature_cache(photos, tmp_path):
    items = _items(photos)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    items = items[:2] + [type(items[0])(str(broken), 0)] + items[2:4]
    dataset = ImageDataset(items, build_transforms(ViTImageProcessor(size={"height": 32, "width": 32}), False))
    model = _vit()
    freeze_layers(model, 4)
    prefix, _ = split_frozen_model(model, 4)
    store = cache_features(prefix, dataset, batch_size=2)
    assert store.valid.tolist() == [True, True, False, True, True] and len(store) == 4
    batch = store.take([1, 2, 3])
    assert batch["features"].shape == (2, 32) and int(batch["failed"]) == 1


def test_bf16_store_halves_memory_and_stays_close(photos):
    items = _items(photos)
    dataset = ImageDataset(items, build_transforms(ViTImageProcessor(size={"height": 32, "width": 32}), False))
    model = _vit()
    freeze_layers(model, 4)
    prefix, _ = split_frozen_model(model, 4)
    fp32 = cache_features(prefix, dataset)
    bf16 = cache_features(prefix, dataset, store_dtype=torch.bfloat16)
    assert bf16.nbytes * 2 == fp32.nbytes
    torch.testing.assert_close(bf16.take(range(len(items)))["features"], fp32.take(range(len(items)))["features"],
                               rtol=1e-2, atol=1e-2)


# ---- prediction fast path -----------------------------------------------------------------------


@pytest.mark.parametrize("processor", [
    ViTImageProcessor(size={"height": 32, "width": 32}),
    ViTImageProcessor(size={"shortest_edge": 40}, do_center_crop=True, crop_size={"height": 32, "width": 32},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3),
])
def test_eval_preprocess_equals_build_transforms(photos, processor):
    from vitft_app.images import load_image
    from vitft_app.predict import EvalPreprocess

    fast, reference = EvalPreprocess(processor), build_transforms(processor, train=False)
    for path in sorted(photos.rglob("*.*")):
        image = load_image(path)
        torch.testing.assert_close(fast(image), reference(image), rtol=0, atol=1e-6)


def test_predictor_bf16_agrees_with_fp32_and_restores_threads(tmp_path, photos):
    from conftest import save_tiny_vit
    from vitft_app.predict import Predictor

    folder = save_tiny_vit(tmp_path / "m", labels=["ants", "bees"])
    paths = [str(p) for p in sorted(photos.rglob("*.*"))]
    exact = Predictor(folder, device="cpu")
    assert exact.plan.precision == "fp32"
    fast = Predictor(folder, device="cpu", precision="bf16", num_threads=1)
    threads = torch.get_num_threads()
    p32, p16 = exact.predict_proba(paths), fast.predict_proba(paths)
    assert torch.get_num_threads() == threads
    torch.testing.assert_close(p16, p32, rtol=0, atol=3e-2)
    # the draft-decoded JPEG path gives what the training run's validation loader gives
    spec_val = ImageDataset([type("I", (), {"path": p, "label": 0})() for p in paths],
                            build_transforms(exact.processor, train=False), exact.draft_size)
    with torch.no_grad():
        expected = exact.model(pixel_values=torch.stack([spec_val[i][0] for i in range(len(paths))])).logits.softmax(-1)
    torch.testing.assert_close(p32, expected, rtol=0, atol=1e-5)


def test_adamw_uses_the_fused_kernel_and_matches_the_reference_update(tiny_vit):
    """The fused AdamW (3.3 ms vs 18 ms per ViT-Tiny update on this CPU) gives the update of
    PyTorch's reference for-loop implementation."""
    from vitft_app.modeling import build_model
    from vitft_app.optim import create_optimizer

    models = [build_model(str(tiny_vit), ["a", "b"]).model for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = create_optimizer(models[0], 1e-2, 0.05, "adamw")
    assert fused.defaults["fused"] is True
    # the same groups, in the same order, on the second model, with the for-loop implementation
    by_name = dict(models[1].named_parameters())
    names = {id(p): n for n, p in models[0].named_parameters()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [by_name[names[id(p)]] for p in g["params"]]}
              for g in fused.param_groups]
    reference = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    torch.manual_seed(0)
    for _ in range(3):
        grads = {n: torch.randn_like(p) for n, p in models[0].named_parameters()}
        for model in models:
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
        fused.step()
        reference.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_slabs_made_during_validation_still_take_training_entries():
    """Validation fills the decode cache inside torch.inference_mode(); a slab allocated there must
    not become an inference tensor, or the next training entry (outside inference mode) fails
    with "Inplace update to inference tensor" (seen on Resume of an --augment none run)."""
    from vitft_app.decode_cache import _SlabStore

    store = _SlabStore(slab_bytes=100)
    with torch.inference_mode():
        first = store.store(torch.ones(10, dtype=torch.uint8))
    second = store.store(torch.full((10,), 2, dtype=torch.uint8))  # same slab, outside inference mode
    assert not first.is_inference() and not second.is_inference()
    assert (first == 1).all() and (second == 2).all()
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
