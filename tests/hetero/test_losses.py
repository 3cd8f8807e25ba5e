import math

import pytest
import torch
import torch.nn.functional as F

from hetero.errors import HeteroError
from hetero.losses import WeightedLoss, cosine_alignment_loss, influence_loss
from hetero.models import CosineClassifier


def _classifier(scale=4.0, margin=0.0):
    c = CosineClassifier(2, 3, scale=scale, margin=margin)
    with torch.no_grad():
        c.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    return c


def test_influence_matches_hand_computed_cross_entropy():
    c = _classifier(scale=4.0)
    edge = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0])
    # cosines: row0 -> (1, 0, -1); row1 -> (0, 1, 0); logits = 4 * cos
    ce0 = -4 + math.log(math.exp(4) + 1 + math.exp(-4))
    ce1 = -0 + math.log(1 + math.exp(4) + 1)
    got = influence_loss(edge, y, None, c)["influence"].item()
    assert got == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def test_influence_margin_raises_the_loss_on_the_target():
    edge = torch.tensor([[1.0, 0.2]])
    y = torch.tensor([0])
    plain = influence_loss(edge, y, None, _classifier())["influence"]
    with_margin = influence_loss(edge, y, None, _classifier(margin=0.3))["influence"]
    expected = -(4 * (F.normalize(edge)[0, 0] - 0.3)) + torch.logsumexp(
        4 * (F.normalize(edge) @ F.normalize(_classifier().weight).t() - torch.tensor([[0.3, 0, 0]])), 1)
    assert with_margin.item() > plain.item()
    assert with_margin.item() == pytest.approx(expected.item(), rel=1e-6)


def test_influence_gradient_moves_edge_toward_its_class_prototype_and_not_the_frozen_head():
    c = _classifier()
    c.requires_grad_(False)
    edge = torch.tensor([[0.6, 0.8]], requires_grad=True)
    influence_loss(edge, torch.tensor([0]), None, c)["influence"].backward()
    step = edge - 0.1 * edge.grad
    assert F.cosine_similarity(step, torch.tensor([[1.0, 0.0]])) > F.cosine_similarity(edge, torch.tensor([[1.0, 0.0]]))
    assert c.weight.grad is None


def test_alignment_values():
    cloud = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    edge = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-2.0, 0.0]])
    y = torch.zeros(3, dtype=torch.long)
    assert cosine_alignment_loss(edge[:1], y[:1], cloud[:1], None)["alignment"].item() == pytest.approx(0.0, abs=1e-7)
    assert cosine_alignment_loss(edge[1:2], y[:1], cloud[1:2], None)["alignment"].item() == pytest.approx(1.0)
    assert cosine_alignment_loss(edge[2:], y[:1], cloud[2:], None)["alignment"].item() == pytest.approx(2.0)
    assert cosine_alignment_loss(edge, y, cloud, None)["alignment"].item() == pytest.approx(1.0)


def test_weighted_loss_sums_named_terms():
    c = _classifier()
    edge = torch.tensor([[0.6, 0.8], [-0.6, 0.8]])
    cloud = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    terms = WeightedLoss({"influence": 0.5, "alignment": 2.0})(edge, y, cloud, c)
    assert set(terms) == {"influence", "alignment", "total"}
    assert terms["total"].item() == pytest.approx(0.5 * terms["influence"].item() + 2.0 * terms["alignment"].item())


def test_loss_configuration_errors():
    with pytest.raises(HeteroError, match="unknown loss 'triplet'"):
        WeightedLoss({"triplet": 1.0})
    with pytest.raises(HeteroError, match=">= 0"):
        WeightedLoss({"alignment": -1.0})
    with pytest.raises(HeteroError, match="no loss"):
        WeightedLoss({})
    with pytest.raises(HeteroError, match="classifier"):
        WeightedLoss({"influence": 1.0})(torch.ones(1, 2), torch.zeros(1, dtype=torch.long), torch.ones(1, 2), None)
