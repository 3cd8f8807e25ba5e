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
    # abs, not rel=1e-6: the value (about 0.136) is a difference of float32 terms near 4, whose last-bit
    # rounding alone is about 5e-7 relative to it (and differs between vectorised exp/log kernels)
    assert with_margin.item() == pytest.approx(expected.item(), abs=1e-6)


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


from hetero.losses import LossContext, LOSSES  # noqa: E402

CTX = LossContext(dim=2, num_classes=3)


def test_alignment_l2_is_squared_distance():
    loss = LOSSES.create("alignment", ctx=CTX, kind="l2")
    edge, cloud = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
    assert loss(edge, None, cloud, None)["alignment"].item() == pytest.approx(0.4**2 + 0.8**2)
    cos = LOSSES.create("alignment", ctx=CTX)(edge, None, cloud, None)["alignment"].item()
    assert loss(edge, None, cloud, None)["alignment"].item() == pytest.approx(2 * cos)  # unit vectors


def test_contrastive_image_and_label_positives_by_hand():
    tau = 0.5
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    img = LOSSES.create("contrastive", ctx=CTX, temperature=tau)(e, torch.tensor([0, 1]), e, None)["contrastive"]
    # abs=1e-6: about 0.127 computed as logsumexp (about 2.127) minus 2 in float32, so one ulp of the
    # logsumexp is already ~2e-6 relative to the result (pytest's default rel=1e-6 would be bitwise-strict)
    assert img.item() == pytest.approx(math.log(1 + math.exp(-1 / tau)), abs=1e-6)
    lab = LOSSES.create("contrastive", ctx=CTX, temperature=tau, positives="label")(e, torch.tensor([0, 0]), e, None)["contrastive"]
    z = math.exp(1 / tau) + 1  # each row: one logit 1/tau, one 0; both keys positive
    assert lab.item() == pytest.approx(-0.5 * ((1 / tau - math.log(z)) + (0 - math.log(z))), abs=1e-6)
    # different labels: same as the image-positive case
    lab2 = LOSSES.create("contrastive", ctx=CTX, temperature=tau, positives="label")(e, torch.tensor([0, 1]), e, None)["contrastive"]
    assert lab2.item() == pytest.approx(img.item(), abs=1e-6)  # log_softmax vs cross_entropy: two code paths


def test_relational_is_zero_when_edge_equals_cloud_and_its_gradient_pulls_toward_it():
    torch.manual_seed(0)
    cloud = F.normalize(torch.randn(6, 4), dim=1)
    loss = LOSSES.create("relational", ctx=CTX, temperature=0.1)
    assert loss(cloud.clone(), None, cloud, None)["relational"].item() == pytest.approx(0.0, abs=1e-6)
    edge = F.normalize(cloud + 0.5 * torch.randn(6, 4), dim=1).requires_grad_(True)
    value = loss(edge, None, cloud, None)["relational"]
    assert value.item() > 0
    value.backward()
    stepped = edge.detach() - 0.01 * edge.grad
    assert loss(stepped, None, cloud, None)["relational"].item() < value.item()
    knn = LOSSES.create("relational", ctx=CTX, temperature=0.1, k=2)(edge.detach(), None, cloud, None)["relational"]
    assert knn.item() >= 0 and knn.item() != pytest.approx(value.item())


def test_ce_and_logit_distill_train_their_own_head():
    ce = LOSSES.create("ce", ctx=CTX, scale=4.0)
    assert sum(p.numel() for p in ce.parameters()) == 6
    with torch.no_grad():
        ce.classifier.weight.copy_(_classifier().weight)
    edge, y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert ce(edge, y, None, None)["ce"].item() == pytest.approx(influence_loss(edge, y, None, _classifier())["influence"].item())
    kd = LOSSES.create("logit_distill", ctx=CTX, temperature=2.0, scale=4.0)
    with torch.no_grad():
        kd.classifier.weight.copy_(_classifier().weight)
    cloud = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])
    assert kd(cloud, None, cloud, _classifier())["logit_distill"].item() == pytest.approx(0.0, abs=1e-6)
    assert kd(cloud.flip(0), None, cloud, _classifier())["logit_distill"].item() > 0.1


def test_loss_options_are_checked():
    with pytest.raises(HeteroError, match="does not take"):
        LOSSES.create("contrastive", ctx=CTX, temprature=0.1)
    with pytest.raises(HeteroError, match="kind"):
        LOSSES.create("alignment", ctx=CTX, kind="l1")
    with pytest.raises(HeteroError, match="not selected"):
        WeightedLoss({"alignment": 1.0}, CTX, {"contrastive": {"temperature": 0.1}})
    with pytest.raises(HeteroError, match="must be a number"):
        WeightedLoss({"alignment": "x"}, CTX)
    w = WeightedLoss({"alignment": 1.0, "contrastive": 0.5, "relational": 2.0, "ce": 1.0}, CTX,
                     {"contrastive": {"positives": "label"}})
    e = F.normalize(torch.randn(4, 2), dim=1)
    terms = w(e, torch.tensor([0, 1, 2, 0]), F.normalize(torch.randn(4, 2), dim=1), None)
    assert set(terms) == {"alignment", "contrastive", "relational", "ce", "total"}
    assert terms["total"].item() == pytest.approx(terms["alignment"].item() + 0.5 * terms["contrastive"].item()
                                                 + 2 * terms["relational"].item() + terms["ce"].item(), rel=1e-5)
    assert w.own_classifier is w.parts["ce"].classifier and not w.needs_classifier
