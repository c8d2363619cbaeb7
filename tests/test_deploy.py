
import pytest
import torch
import torchvision

from tests.helpers import randomize_batchnorms
from torch_pruning_ext import IntraFusionPruner, OptimalTransport
from torch_pruning_ext.export import export_onnx
from torch_pruning_ext.serialization import NotAPrunedModel, load_pruned, save_pruned


@pytest.mark.slow
@pytest.mark.parametrize("name, groups", [("vgg11_bn", [1, 4, 7]), ("resnet18", [0, 3, 6, 9, 11])])
def test_save_load_round_trip_is_exact(make_model, tmp_path, name, groups):
    model = make_model(name)
    IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn="exact").prune(groups, 0.6, OptimalTransport())
    save_pruned(model, tmp_path / "pruned.pt", name, 10)
    loaded = load_pruned(tmp_path / "pruned.pt")
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    IntraFusionPruner(loaded, x[:1]).prune([2], 0.5)  # the copy is a plain model that prunes again


@pytest.mark.slow
def test_other_architectures_load_with_a_builder(tmp_path):
    torch.manual_seed(0)
    build = lambda: torchvision.models.resnet18(num_classes=10)  # noqa: E731
    model = randomize_batchnorms(build())
    IntraFusionPruner(model, torch.randn(1, 3, 64, 64), fold_bn="exact").prune([0, 5], 0.5, OptimalTransport())
    save_pruned(model, tmp_path / "tv.pt")
    with pytest.raises(ValueError, match="holds a torchvision.models.resnet.ResNet; pass builder="):
        load_pruned(tmp_path / "tv.pt")
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(load_pruned(tmp_path / "tv.pt", builder=build)(x), model(x))


def test_loading_something_else_is_a_clear_error(tmp_path, make_model):
    torch.save(make_model("vgg11_bn").state_dict(), tmp_path / "plain.pt")
    with pytest.raises(NotAPrunedModel, match="is not a saved pruned model"):
        load_pruned(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(NotAPrunedModel, match="cannot be read"):
        load_pruned(tmp_path / "junk.pt")


@pytest.mark.slow
def test_onnx_export_matches_pytorch(make_model, tmp_path):
    model = make_model("resnet18")
    IntraFusionPruner(model, torch.randn(1, 3, 32, 32), fold_bn="exact").prune([0, 4], 0.5, OptimalTransport())
    difference = export_onnx(model, torch.randn(4, 3, 32, 32), tmp_path / "m.onnx")
    assert difference < 1e-4 and (tmp_path / "m.onnx").stat().st_size > 0
    from torch_pruning_ext.export import onnx_outputs
    other_batch = torch.randn(7, 3, 32, 32)  # the batch axis is dynamic
    assert abs(onnx_outputs(tmp_path / "m.onnx", other_batch) - model(other_batch).detach().numpy()).max() < 1e-4
