"""The model zoo: shapes, parameter counts, traceability, exact merging of permuted copies, the fixed head."""
import copy

import numpy as np
import pytest
import torch
import torch.fx
from test_merge_engine import equivalent_copy, rel_err
from toy_models import randomize_bn

from fedmerge import merge_models
from fedmerge.common.engine.graph import FIXED, derive_spec
from fedmerge.common.task.models import (
    ARCHS,
    ClassEmbeddingHead,
    build_model,
    count_parameters,
)

CIFAR = (3, 32)
MNIST = (1, 28)
# transformable groups per arch: VGG one per conv; ResNets one residual stream per stage + one inner basis
# per block; MLP two hidden layers; CNN two convs + one hidden linear
GROUPS = {"vgg11": 8, "vgg16": 13, "vgg11_bn": 8, "vgg16_bn": 13, "resnet20": 3 + 9, "resnet18": 4 + 8,
          "mlp": 2, "cnn": 3}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and avoids OpenMP barrier stalls (100x slower
    convolutions measured) when other processes share the 2 cores. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _x(shape, n=2, seed=0):
    c, s = shape
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_shapes_and_config(arch):
    for (c, s), width, nc in [(CIFAR, 0.25, 10), (MNIST, 0.125, 7), (CIFAR, 0.5, 3)]:
        m = build_model(arch, num_classes=nc, width=width, in_channels=c, image_size=s).eval()
        with torch.no_grad():
            out = m(_x((c, s)))
        assert out.shape == (2, nc)
        assert m.fedmerge_config == {"arch": arch, "num_classes": nc, "width": width, "in_channels": c,
                                     "image_size": s, "head": None}
        # the config rebuilds an interchangeable model; deepcopy keeps it
        other = build_model(**m.fedmerge_config)
        other.load_state_dict(m.state_dict(), strict=True)
        twin = copy.deepcopy(m)
        assert twin.fedmerge_config == m.fedmerge_config
        with torch.no_grad():
            assert torch.equal(other.eval()(_x((c, s))), out)


def test_parameter_counts():
    assert abs(count_parameters(build_model("vgg11")) - 9.23e6) / 9.23e6 < 0.02
    assert count_parameters(build_model("vgg11")) == 9_225_610
    assert count_parameters(build_model("resnet20")) == 272_474  # option B shortcuts: 0.27M
    assert count_parameters(build_model("resnet18")) == 11_173_962
    # width scales the hidden channels; the head buffer is not a parameter
    assert count_parameters(build_model("vgg11", width=0.5)) < 0.3 * 9.23e6
    head = ClassEmbeddingHead.orthonormal(10, 16, seed=0)
    m = build_model("resnet20", head=head)
    assert count_parameters(m) == 272_474 - 65 * 10 + 65 * 16


@pytest.mark.parametrize("arch", ARCHS)
def test_derive_spec_on_every_arch(arch):
    for shape, head in [(CIFAR, None), (MNIST, ClassEmbeddingHead.orthonormal(10, 12, seed=1))]:
        m = build_model(arch, width=0.25, in_channels=shape[0], image_size=shape[1], head=head)
        torch.fx.symbolic_trace(m)  # plain torch.fx as well as the project's tracer
        spec = derive_spec(m, _x(shape))
        assert len(spec.groups) == GROUPS[arch]
        assert spec.layers["classifier"].out[0].group == FIXED  # logits / head input never transform
        first = next(iter(spec.layers.values()))
        assert first.inp[0].group == FIXED


def test_resnet20_residual_streams():
    spec = derive_spec(build_model("resnet20", width=0.5), _x(CIFAR))
    g = lambda name: spec.layers[name].out[0].group  # noqa: E731
    stream1 = g("conv1")
    assert all(g(f"layer1.{i}.bn2") == stream1 for i in range(3))
    for s in (2, 3):
        stream = g(f"layer{s}.0.shortcut.0")
        assert stream != stream1 and all(g(f"layer{s}.{i}.bn2") == stream for i in range(3))
    assert len({g(f"layer{s}.0.shortcut.0") for s in (2, 3)} | {stream1}) == 3
    assert spec.layers["conv1"].norm == "bn1"


def _zoo_model_and_probe(arch, width, bn):
    # the probe must give more samples than units at every site (the last VGG convs see a 2x2 map of a 32x32
    # input); ResNets run on 16x16 to keep the float64 statistics cheap
    size, n = (32, 48) if arch.startswith("vgg") else (16, 32)
    torch.manual_seed(0)
    a = build_model(arch, width=width, image_size=size)
    a = randomize_bn(a) if bn else a.eval()
    # float64 end to end: these tests check the algebra's exactness on tiny, rank-deficient probes (gamma down
    # to 1e-6), where float32 activation products (the fast path for float32 models) would add ~1e-4 noise
    return a.double(), _x((3, size), n=n, seed=3).double()


ZOO = [("vgg11", 0.25, False), ("resnet20", 0.5, True)]


@pytest.mark.parametrize("arch,width,bn", ZOO)
@pytest.mark.parametrize("method,gamma", [("permute", 0.1), ("cca", 0.1), ("cca", 1e-6)])
def test_merge_permuted_copy_of_zoo_model_is_exact(arch, width, bn, method, gamma):
    a, x = _zoo_model_and_probe(arch, width, bn)
    b = equivalent_copy(a, x, "perm")  # no hand-written spec: derived from the traced model
    merged = merge_models([a, b], x, method=method, gamma=gamma, bn_reset=False)
    with torch.no_grad():
        assert rel_err(merged(x), a(x)) <= 1e-4
        assert rel_err(merge_models([a, b], x, method="avg", bn_reset=False)(x), a(x)) > 1e-3


@pytest.mark.parametrize("arch,width,bn", ZOO)
def test_cca_merge_rescaled_copy_of_zoo_model_is_exact(arch, width, bn):
    a, x = _zoo_model_and_probe(arch, width, bn)
    b = equivalent_copy(a, x, "scale")
    # the scale-free "corr" ridge is exact on rescaled copies for any gamma (the default "trace" ridge only
    # as gamma -> 0, which a 48-image probe cannot resolve at VGG's 1x1 maps)
    merged = merge_models([a, b], x, method="cca", gamma=0.1, bn_reset=False, regularization="corr")
    with torch.no_grad():
        assert rel_err(merged(x), a(x)) <= 1e-4


def test_merge_with_embedding_head_keeps_head_fixed():
    torch.manual_seed(0)
    head = ClassEmbeddingHead.orthonormal(10, 16, seed=0)
    a = build_model("cnn", width=0.25, image_size=16, head=head).eval()
    x = _x((3, 16), n=32, seed=4)
    b = equivalent_copy(a, x, "perm")
    merged = merge_models([a, b], x, method="cca", gamma=0.1, bn_reset=False)
    assert torch.equal(merged.head.embeddings, head.embeddings)
    with torch.no_grad():
        assert rel_err(merged(x), a(x)) <= 1e-4


def test_class_embedding_head_is_fixed_and_orthonormal():
    h = ClassEmbeddingHead.orthonormal(10, 16, seed=3)
    e = h.embeddings
    assert e.shape == (10, 16) and h.fedmerge_fixed_input is True
    assert torch.allclose(e @ e.T, torch.eye(10), atol=1e-5)
    assert torch.equal(ClassEmbeddingHead.orthonormal(10, 16, seed=3).embeddings, e)
    assert not torch.equal(ClassEmbeddingHead.orthonormal(10, 16, seed=4).embeddings, e)
    assert list(h.parameters()) == [] and "embeddings" in h.state_dict() and not e.requires_grad
    with pytest.raises(ValueError, match="dim >= num_classes"):
        ClassEmbeddingHead.orthonormal(10, 4)

    m = build_model("mlp", width=0.05, num_classes=10, head=h)
    assert m.head is not h and torch.equal(m.head.embeddings, e)  # a private copy
    assert m.fedmerge_config["head"] == {"kind": "embedding", "dim": 16, "temperature": 0.05}
    assert m.classifier.out_features == 16 and "head.embeddings" in m.state_dict()
    x = _x(CIFAR, n=8)
    y = torch.arange(8) % 10
    before = m.head.embeddings.clone()
    torch.optim.SGD(m.parameters(), lr=1.0).zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    assert m.classifier.weight.grad is not None and torch.equal(m.head.embeddings, before)
    # logits are cosine similarities / temperature
    with torch.no_grad():
        feats = m.classifier(m.features(torch.flatten(x, 1)))
        expect = torch.nn.functional.normalize(feats, dim=1) @ e.T / 0.05
        assert torch.allclose(m(x), expect, atol=1e-4)
        assert m(x).abs().max() <= 1 / 0.05 + 1e-3
    # an array works as a head too; the class count must match
    assert build_model("cnn", width=0.1, head=e.numpy()).fedmerge_config["head"]["dim"] == 16
    with pytest.raises(ValueError, match="10 classes but num_classes=5"):
        build_model("cnn", num_classes=5, head=h)


def test_class_embedding_from_npy_and_bad_shapes(tmp_path):
    e = ClassEmbeddingHead.orthonormal(5, 8, seed=0).embeddings.numpy()
    np.save(tmp_path / "e.npy", e)
    back = ClassEmbeddingHead.from_npy(tmp_path / "e.npy", temperature=0.1)
    assert np.allclose(back.embeddings.numpy(), e, atol=1e-6) and back.temperature == 0.1
    for bad, pattern in [(np.zeros(8), "shape"), (np.zeros((2, 3, 4)), "shape"), (np.zeros((0, 4)), "shape"),
                         (np.zeros((3, 4)), "zero rows"), (np.full((3, 4), np.nan), "non-finite"),
                         (np.array([["a", "b"]]), "numeric")]:
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(ValueError, match=pattern):
            ClassEmbeddingHead.from_npy(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="cannot read"):
        ClassEmbeddingHead.from_npy(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="temperature"):
        ClassEmbeddingHead(e, temperature=0)


def test_checkpoint_round_trip_with_head(tmp_path):
    from fedmerge.common.task.checkpoint import load_checkpoint, save_checkpoint

    m = build_model("resnet20", width=0.25, num_classes=10, in_channels=1, image_size=28,
                    head=ClassEmbeddingHead.orthonormal(10, 12, seed=2, temperature=0.1)).eval()
    save_checkpoint(m, tmp_path / "ck")
    back, meta = load_checkpoint(tmp_path / "ck")
    assert back.fedmerge_config == m.fedmerge_config == meta["model"]
    x = _x(MNIST, n=3)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown architecture 'vgg19'.*vgg11.*resnet20"):
        build_model("vgg19")
    with pytest.raises(ValueError, match="width"):
        build_model("cnn", width=0)
    with pytest.raises(ValueError, match="width"):
        build_model("cnn", width=float("nan"))
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", num_classes=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("cnn", num_classes=2.5)
    with pytest.raises(ValueError, match="head"):
        build_model("cnn", head="orthonormal")
