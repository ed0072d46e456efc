"""make_norm and NormSpec: every kind, spec strings, options, errors."""

import pytest
import torch

from groupnorm import nn as gnn
from groupnorm.nn import NormSpec, make_norm


@pytest.mark.parametrize("kind,cls", [("bn", gnn.BatchNorm), ("syncbn", gnn.BatchNorm),
                                      ("brn", gnn.BatchRenorm), ("gn", gnn.GroupNorm),
                                      ("ln", gnn.LayerNorm), ("in", gnn.InstanceNorm),
                                      ("none", torch.nn.Identity), ("GN", gnn.GroupNorm)])
def test_every_kind(kind, cls):
    m = make_norm(kind, 64)
    assert type(m) is cls
    x = torch.randn(4, 64, 3, 3)
    assert m(x).shape == x.shape


def test_defaults_and_options():
    assert make_norm("gn", 64).num_groups == 32
    assert make_norm("gn", 64, num_groups=8).num_groups == 8
    gn = make_norm("gn", 64, group_size=16, eps=1e-3, activation="relu", affine=False)
    assert (gn.num_groups, gn.eps, gn.activation, gn.weight) == (4, 1e-3, "relu", None)
    assert make_norm("syncbn", 8).sync is True
    assert make_norm("bn", 8, images_per_worker=4, momentum=0.2).images_per_worker == 4
    brn = make_norm("brn", 8, r_max=2.0, d_max=1.0, images_per_worker=2, warmup_iters=0)
    assert (brn.r_max, brn.d_max, brn.images_per_worker, brn.warmup_iters) == (2.0, 1.0, 2, 0)
    assert make_norm("in", 8, images_per_worker=None).num_groups == 8   # None means default
    assert isinstance(make_norm("none", 8, num_groups=3, anything=1), torch.nn.Identity)


@pytest.mark.parametrize("text,spec", [
    ("gn", NormSpec("gn")), ("gn:16", NormSpec("gn", num_groups=16)),
    ("gn/8", NormSpec("gn", group_size=8)), ("bn@4", NormSpec("bn", images_per_worker=4)),
    ("brn@2", NormSpec("brn", images_per_worker=2)), (" BN ", NormSpec("bn")), ("none", NormSpec("none")),
])
def test_spec_strings_round_trip(text, spec):
    assert NormSpec.parse(text) == spec
    assert NormSpec.parse(str(spec)) == spec


def test_specs_build_the_right_layers():
    assert make_norm("gn:16", 64).num_groups == 16
    assert make_norm("gn/16", 64).num_groups == 4
    assert make_norm("bn@4", 64).images_per_worker == 4
    assert make_norm(NormSpec("brn", images_per_worker=4), 64).images_per_worker == 4
    assert make_norm(NormSpec("gn", group_size=8), 64).num_groups == 8
    assert make_norm("gn/16", 64, num_groups=2).num_groups == 2          # explicit option wins
    assert make_norm("bn@4", 64, images_per_worker=8).images_per_worker == 8


@pytest.mark.parametrize("call,exc,match", [
    (lambda: make_norm("batchnorm", 8), ValueError,
     r"unknown normalization kind 'batchnorm'; valid kinds: bn, syncbn, brn, gn, ln, in, none"),
    (lambda: make_norm("gn@4", 8), ValueError, r"'@' applies to 'bn' and 'brn' only"),
    (lambda: make_norm("bn:4", 8), ValueError, r"':' applies to 'gn' only"),
    (lambda: make_norm("gn:x", 8), ValueError, r"cannot parse normalization spec"),
    (lambda: make_norm("bn", 8, num_groups=4), TypeError, r"\['num_groups'\] do not apply to kind 'bn'"),
    (lambda: make_norm("gn", 8, activation="relu", momentum=0.1), TypeError, r"momentum"),
    (lambda: make_norm("gn", 24), ValueError, r"num_channels=24 is not divisible by num_groups=32"),
    (lambda: make_norm("gn/16", 64, num_groups=2, group_size=8), ValueError, r"exactly one"),
    (lambda: make_norm(3, 8), TypeError, r"str or NormSpec"),
    (lambda: NormSpec("ln", group_size=2), ValueError, r"group_size applies to 'gn' only"),
    (lambda: NormSpec("gn", images_per_worker=2), ValueError, r"'bn' and 'brn' only"),
])
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---- NormSpec is the one parser of norm specs (issue 15, item 15) -----------------------------------
@pytest.mark.parametrize("text,spec", [
    ("bn @ 32", NormSpec("bn", images_per_worker=32)), (" gn : 16 ", NormSpec("gn", num_groups=16)),
    ("gn / 8", NormSpec("gn", group_size=8)), ("BRN@4", NormSpec("brn", images_per_worker=4)),
])
def test_spaces_and_case_are_read_one_way(text, spec):
    assert NormSpec.parse(text) == spec
    assert str(NormSpec.parse(text)) == str(spec)


@pytest.mark.parametrize("text,match", [
    ("gn:0", "num_groups must be >= 1, got 0"), ("gn/0", "group_size must be >= 1, got 0"),
    ("bn@0", "images_per_worker must be >= 1, got 0"), ("bn@", "cannot parse"), ("gn:-2", "cannot parse"),
    ("gn:1.5", "cannot parse"), ("", "cannot parse"),
])
def test_bad_numbers_are_refused_at_parse_time(text, match):
    with pytest.raises(ValueError, match=match):
        NormSpec.parse(text)


def test_spec_fields_are_checked():
    for kwargs in ({"num_groups": 0}, {"num_groups": True}, {"num_groups": 2.0}, {"group_size": -1}):
        with pytest.raises(ValueError, match="must be"):
            NormSpec("gn", **kwargs)
    with pytest.raises(ValueError, match="images_per_worker must be >= 1"):
        NormSpec("bn", images_per_worker=0)


def test_bare_gn_takes_the_callers_default_groups():
    """convert_norm(model, "gn", num_groups=16): a bare "gn" takes the caller's G, "gn:8" keeps 8."""
    assert NormSpec.parse("gn", num_groups=16) == NormSpec("gn", num_groups=16)
    assert NormSpec.parse(" gn ", group_size=4) == NormSpec("gn", group_size=4)
    assert NormSpec.parse("gn:8", num_groups=16) == NormSpec("gn", num_groups=8)
    assert NormSpec.parse("gn/2", num_groups=16) == NormSpec("gn", group_size=2)
    assert NormSpec.parse("bn", num_groups=16) == NormSpec("bn")
