import pytest
import torch
import torch.nn as nn

from tests.helpers import Chain
from torch_pruning_ext.experiments.footprint import csr_bytes, footprint
from torch_pruning_ext.experiments.unstructured import global_magnitude_prune, make_permanent, weight_sparsity


def test_footprint_is_exact_for_a_model_known_by_hand():
    model = Chain()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[0, :10] = 1.0
    result = footprint(model, torch.zeros(1, 3, 8, 8))
    assert result.params == 108 + 4 + 1280 + 5
    assert result.dense_bytes == 4 * 1397
    # conv weight (4 rows, all nonzero with probability 1) + biases dense + fc weight 10 nonzeros in CSR
    conv_nonzero = int(torch.count_nonzero(model.conv.weight))
    assert result.sparse_bytes == (conv_nonzero * 8 + 5 * 4) + 4 * 4 + (10 * 8 + 6 * 4) + 5 * 4
    # leaf modules: conv 192 in + 256 out, fc 256 in + 5 out (the functional relu is no module)
    assert result.peak_activation_bytes == 4 * (192 + 256)


def test_csr_of_a_dense_vector_is_dense():
    assert csr_bytes(torch.ones(7)) == 28


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_global_pruning_reaches_the_sparsity_exactly_and_becomes_plain(sparsity):
    torch.manual_seed(0)
    model = Chain()
    total = 108 + 1280
    global_magnitude_prune(model, sparsity)
    assert weight_sparsity(model) == round(sparsity * total) / total
    kept = model.fc.weight.detach().abs()
    removed_max = model.fc.weight_orig.detach().abs()[model.fc.weight_mask == 0].max()
    assert kept[kept > 0].min() >= removed_max  # the smallest magnitudes went
    make_permanent(model)
    assert not hasattr(model.fc, "weight_mask") and isinstance(model.fc.weight, nn.Parameter)
    assert set(model.state_dict()) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert weight_sparsity(model) == round(sparsity * total) / total


def test_global_pruning_rejects_bad_sparsity():
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\), got 1.2"):
        global_magnitude_prune(Chain(), 1.2)
