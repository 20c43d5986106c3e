"""The spec language: every field parses and round-trips; every error names source, rule, field and line."""

from __future__ import annotations

import pathlib
import pickle
import textwrap

import pytest
import yaml
from torch import nn

from timm_drop.regularizers import registry
from timm_drop.regularizers.base import ParamError, Regularizer, check_positive_int, check_probability
from timm_drop.schedules import Schedule
from timm_drop.spec import (
    MAX_RULES,
    MAX_SPEC_BYTES,
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    SITE_KINDS,
    Rule,
    Spec,
    SpecError,
    load_spec,
    match_pattern,
)


# Test-only regularizers with known validation, so these tests do not depend on how the built-in methods
# phrase their errors. Registered for this module only and removed afterwards.
class _Block(Regularizer):
    def __init__(self, drop_prob: float, block_size: int, per_channel: bool = True) -> None:
        super().__init__()
        self.drop_prob = check_probability("drop_prob", drop_prob)
        self.block_size = check_positive_int("block_size", block_size)
        if not isinstance(per_channel, bool):
            raise TypeError(f"per_channel must be a bool, got {per_channel!r}")


class _Scale(Regularizer):
    def __init__(self, top_rate: float, q: float) -> None:
        super().__init__()
        self.top_rate = check_probability("top_rate", top_rate, allow_one=True)
        self.q = check_probability("q", q, allow_one=True)


class _NoStrength(Regularizer):
    def __init__(self, size: int = 3) -> None:
        super().__init__()
        check_positive_int("size", size)


class _Grumpy(Regularizer):
    """Raises an error that names no parameter."""

    def __init__(self, drop_prob: float = 0.1) -> None:
        super().__init__()
        raise ValueError("this regularizer refuses to exist")


_TEST_REGULARIZERS = {
    "sp_block": _Block,
    "sp_scale": _Scale,
    "sp_nostrength": _NoStrength,
    "sp_grumpy": _Grumpy,
}


@pytest.fixture(scope="module", autouse=True)
def _test_regularizers():
    registry.list_regularizers()  # register the built-ins first
    for name, cls in _TEST_REGULARIZERS.items():
        registry.register_regularizer(name, cls)
    yield
    for name in _TEST_REGULARIZERS:
        registry._REGISTRY.pop(name, None)


FULL = textwrap.dedent(
    """\
    version: 1
    description: every field once
    rules:
      - regularizer: sp_block
        params: {drop_prob: 0.1, block_size: 7}
        sites: [norm, shortcut]
        stages: [3, 4]
        name: "layer*"
        type: BatchNorm2d
        exclude: ["*.downsample*"]
        stage_params: {3: {drop_prob: 0.025}}
        schedule: {kind: linear, start: 0.0, end: 0.5}
        depth_scaling: linear
        norm_position: after_act
        on_conflict: stack
        allow_empty: true
        label: "DropBlock groups 3-4"
      - regularizer: sp_scale
        params: {top_rate: 0.5, q: 0.2}
        sites: block
        on_conflict: replace
        schedule: {kind: curriculum, gamma: 5.0}
    """
)


def _error(src) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(src)
    return info.value


def _rule(**fields) -> dict:
    rule = {"regularizer": "sp_block", "params": {"drop_prob": 0.1, "block_size": 3}, "sites": "norm"}
    rule.update(fields)
    return {"rules": [rule]}


# -- accepted fields ------------------------------------------------------------------------------------
def test_every_field_is_parsed_into_the_rule():
    spec = load_spec(FULL)
    assert spec.source == "<string>" and spec.description == "every field once" and spec.version == 1
    r, s = spec.rules
    assert (r.index, r.regularizer, str(r)) == (0, "sp_block", "rule 1 (sp_block)")
    assert dict(r.params) == {"drop_prob": 0.1, "block_size": 7}
    assert r.sites == ("norm", "shortcut")
    assert r.stages == (3, 4)
    assert r.name == ("layer*",) and r.type == ("BatchNorm2d",) and r.exclude == ("*.downsample*",)
    assert {k: dict(v) for k, v in r.stage_params.items()} == {3: {"drop_prob": 0.025}}
    assert r.schedule == Schedule(kind="linear", start=0.0, end=0.5)
    assert (r.depth_scaling, r.norm_position, r.on_conflict, r.allow_empty) == (
        "linear",
        "after_act",
        "stack",
        True,
    )
    assert r.label == "DropBlock groups 3-4" and r.describe() == "rule 1 (sp_block) 'DropBlock groups 3-4'"
    assert (str(s), s.sites, s.on_conflict, s.schedule.kind, s.schedule.gamma) == (
        "rule 2 (sp_scale)",
        ("block",),
        "replace",
        "curriculum",
        5.0,
    )


def test_optional_fields_take_their_documented_defaults():
    (r,) = load_spec(_rule()).rules
    assert r.stages is None and r.name is None and r.type is None and r.exclude == ()
    assert dict(r.stage_params) == {} and r.depth_scaling is None and r.schedule is None
    assert (r.norm_position, r.on_conflict, r.allow_empty, r.label) == ("after_norm", "error", False, None)


def test_to_dict_round_trips_through_load_spec_and_yaml():
    spec = load_spec(FULL)
    again = load_spec(spec.to_dict())
    assert again.rules == spec.rules and again.description == spec.description
    assert load_spec(spec.to_yaml()).rules == spec.rules
    assert load_spec(again.to_dict()).to_dict() == spec.to_dict()
    # plain data only: safe_dump refuses mappingproxy, tuples would come back as python/tuple tags
    assert "!!python" not in spec.to_yaml()


def test_to_dict_holds_only_plain_builtins_so_weights_only_checkpoints_can_carry_it():
    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, (str, int)) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    assert plain(load_spec(FULL).to_dict())
    hand = Spec(rules=(Rule(0, "sp_block", {"drop_prob": 0.1, "block_size": 3}, ("norm",), name=("a", "b")),))
    assert yaml.safe_load(hand.to_yaml())["rules"][0]["name"] == ["a", "b"]


def test_rules_given_as_a_single_mapping_are_one_rule():
    spec = load_spec({"rules": _rule()["rules"][0]})
    assert len(spec.rules) == 1 and spec.rules[0].regularizer == "sp_block"


def test_stage_params_keys_may_be_ints_or_digit_strings():
    spec = load_spec(
        "rules: [{regularizer: sp_block, params: {drop_prob: 0.1, block_size: 3}, sites: norm,\n"
        '          stage_params: {"3": {drop_prob: 0.02}, 4: {block_size: 1}}}]'
    )
    r = spec.rules[0]
    assert sorted(r.stage_params) == [3, 4]
    assert r.params_for_stage(3) == {"drop_prob": 0.02, "block_size": 3}
    assert r.params_for_stage(4) == {"drop_prob": 0.1, "block_size": 1}
    assert r.params_for_stage(2) == r.params_for_stage(None) == {"drop_prob": 0.1, "block_size": 3}
    err = _error(_rule(stage_params={"3": {"drop_prob": 0.02}, 3: {"drop_prob": 0.03}}))
    assert "field 'stage_params.3'" in str(err) and "twice" in str(err)


def test_per_stage_params_may_complete_the_base_params_when_stages_are_listed():
    # CorrDrop style: block sizes 9/7/5 per stage, nothing in the base for block_size.
    sp = {2: {"block_size": 9}, 3: {"block_size": 7}, 4: {"block_size": 5}}
    r = load_spec(_rule(params={"drop_prob": 0.1}, stages=[2, 3, 4], stage_params=sp)).rules[0]
    assert [r.params_for_stage(s)["block_size"] for s in (2, 3, 4)] == [9, 7, 5]
    # without `stages` the base params also serve un-overridden stages and must be complete
    err = _error(_rule(params={"drop_prob": 0.1}, stage_params=sp))
    assert "rule 1 (sp_block), field 'params': sp_block needs 'block_size'" in str(err)
    # a listed stage without an override needs complete base params too
    err = _error(_rule(params={"drop_prob": 0.1}, stages=[1, 2, 3, 4], stage_params=sp))
    assert "field 'params': sp_block needs 'block_size'" in str(err)


def test_single_strings_become_one_element_tuples_and_duplicate_sites_collapse():
    r = load_spec(
        _rule(sites=["norm", "norm", "block"], name="layer1", type="Conv2d", exclude="x", stages=2)
    ).rules[0]
    assert (r.sites, r.name, r.type, r.exclude, r.stages) == (
        ("norm", "block"),
        ("layer1",),
        ("Conv2d",),
        ("x",),
        (2,),
    )


def test_every_site_kind_is_accepted():
    r = load_spec(_rule(sites=list(SITE_KINDS), name="*")).rules[0]
    assert r.sites == SITE_KINDS


def test_precedence_and_placement_fields_parse():
    for mode in ("error", "stack", "replace"):
        assert load_spec(_rule(on_conflict=mode)).rules[0].on_conflict == mode
    for pos in ("after_norm", "after_act"):
        assert load_spec(_rule(norm_position=pos)).rules[0].norm_position == pos


def test_load_spec_of_a_spec_returns_it_and_revalidates_hand_built_ones():
    spec = load_spec(FULL)
    assert load_spec(spec) is spec
    bad = Spec(rules=(Rule(0, "sp_block", {"drop_prob": 2.0, "block_size": 3}, ("norm",)),), source="<hand>")
    err = _error(bad)
    assert "spec <hand>" in str(err) and "rule 1 (sp_block), field 'params.drop_prob'" in str(err)


def test_rules_are_immutable_and_hashable():
    r = load_spec(FULL).rules[0]
    with pytest.raises(TypeError):
        r.params["drop_prob"] = 0.5  # type: ignore[index]
    with pytest.raises(AttributeError):
        r.sites = ("block",)  # type: ignore[misc]
    assert {r: 1}[load_spec(FULL).rules[0]] == 1


# -- name / type / exclude semantics ------------------------------------------------------------------
@pytest.mark.parametrize(
    "pattern, qualname, expected",
    [
        ("layer1", "layer1", True),
        ("layer1", "layer10", False),  # the re.match/startswith trap
        ("layer1", "layer1.0", False),
        ("layer1.*", "layer1.0.conv1", True),
        ("layer1.*", "layer10.0.conv1", False),
        ("*.bn1", "layer2.0.bn1", True),
        ("*.bn1", "layer2.0.bn10", False),
        ("stages.[0-1].*", "stages.1.blocks.0", True),
        ("re:layer1", "layer10", False),
        ("re:layer[0-9]+", "layer10", True),
        ("re:layer[12]\\.0", "layer2.0", True),
        ("re:layer[12]\\.0", "layer2.0.conv1", False),
        ("re:.*conv1", "layer1.0.conv1", True),
        ("Layer1", "layer1", False),  # case-sensitive
    ],
)
def test_patterns_are_full_matches(pattern, qualname, expected):
    assert match_pattern(pattern, qualname) is expected


def test_rule_name_and_exclude_selectors_use_the_shared_semantics():
    r = load_spec(_rule(name=["layer1.*", "re:layer3\\.[0-9]+"], exclude="*.downsample*")).rules[0]
    assert r.matches_name("layer1.0.conv1") and r.matches_name("layer3.12")
    assert not r.matches_name("layer10.0.conv1") and not r.matches_name("layer3.1.conv1")
    assert r.is_excluded("layer1.0.downsample.0") and not r.is_excluded("layer1.0.conv1")
    unrestricted = load_spec(_rule()).rules[0]
    assert unrestricted.matches_name("anything.at.all") and not unrestricted.is_excluded("layer1")


def test_type_selector_matches_through_the_class_hierarchy():
    class FancyBN(nn.BatchNorm2d):
        pass

    r = load_spec(_rule(type="BatchNorm2d")).rules[0]
    assert (
        r.matches_type(FancyBN(4))
        and r.matches_type(nn.BatchNorm2d(4))
        and not r.matches_type(nn.Conv2d(1, 1, 1))
    )
    dotted = load_spec(_rule(type="torch.nn.modules.batchnorm.BatchNorm2d")).rules[0]
    assert dotted.matches_type(FancyBN(4)) and not dotted.matches_type(nn.LayerNorm(4))
    assert load_spec(_rule()).rules[0].matches_type(nn.ReLU())


def test_stage_selector_none_means_everywhere_including_outside_stages():
    everywhere = load_spec(_rule()).rules[0]
    assert everywhere.matches_stage(None) and everywhere.matches_stage(7)
    some = load_spec(_rule(stages=[3, 4])).rules[0]
    assert some.matches_stage(3) and not some.matches_stage(2) and not some.matches_stage(None)


# -- errors: each names the rule and the field ------------------------------------------------------------
@pytest.mark.parametrize(
    "fields, where, says",
    [
        ({"regularizer": "sp_blok"}, "field 'regularizer'", "did you mean 'sp_block'"),
        ({"regularizer": 3}, "field 'regularizer'", "must be a registry name"),
        (
            {"params": {"drop_prob": 1.5, "block_size": 3}},
            "field 'params.drop_prob'",
            "must be in [0, 1), got 1.5",
        ),
        ({"params": {"drop_prob": 0.1, "block_size": 0}}, "field 'params.block_size'", "must be >= 1, got 0"),
        ({"params": {"drop_prob": "0.1", "block_size": 3}}, "field 'params.drop_prob'", "must be a number"),
        (
            {"params": {"drop_prob": 0.1, "blok_size": 3}},
            "field 'params.blok_size'",
            "did you mean 'block_size'",
        ),
        ({"params": [0.1, 3]}, "field 'params'", "must be a mapping"),
        ({"params": {"drop_prob": 0.1}}, "field 'params'", "sp_block needs 'block_size'"),
        (
            {"stage_params": {3: {"drop_prob": 1.5}}},
            "field 'stage_params.3.drop_prob'",
            "must be in [0, 1), got 1.5",
        ),
        (
            {"stage_params": {3: {"drop_rate": 0.1}}},
            "field 'stage_params.3.drop_rate'",
            "did you mean 'drop_prob'",
        ),
        ({"stage_params": {0: {"drop_prob": 0.1}}}, "field 'stage_params.0'", "non-zero integers"),
        ({"stage_params": {"x3": {"drop_prob": 0.1}}}, "field 'stage_params.x3'", "non-zero integers"),
        ({"stage_params": [0.1]}, "field 'stage_params'", "must map stage numbers"),
        ({"stages": [3], "stage_params": {4: {"drop_prob": 0.1}}}, "field 'stage_params.4'", "never apply"),
        ({"sites": "nrom"}, "field 'sites'", "did you mean 'norm'"),
        ({"sites": ["norm", "blok"]}, "field 'sites[1]'", "did you mean 'block'"),
        ({"sites": []}, "field 'sites'", "non-empty list"),
        ({"sites": "module"}, "field 'sites'", "needs a 'name' or 'type' selector"),
        ({"stages": [0, 2]}, "field 'stages[0]'", "non-zero integers"),
        ({"stages": [2, 0.5]}, "field 'stages[1]'", "got 0.5"),
        ({"stages": ["3"]}, "field 'stages[0]'", "got '3'"),
        ({"stages": [True]}, "field 'stages[0]'", "got True"),
        ({"stages": 1.5}, "field 'stages'", "non-zero integer"),
        ({"stages": []}, "field 'stages'", "leave it out to select every stage"),
        ({"name": "re:("}, "field 'name'", "invalid regular expression '('"),
        ({"name": ["layer*", "re:[a-"]}, "field 'name[1]'", "invalid regular expression"),
        ({"exclude": "re:"}, "field 'exclude'", "must be followed by a regular expression"),
        ({"name": ""}, "field 'name'", "non-empty string"),
        ({"name": 5}, "field 'name'", "got 5"),
        ({"type": "Batch Norm"}, "field 'type'", "must be a class name"),
        ({"schedule": {"kind": "lin"}}, "field 'schedule'", "got 'lin'"),
        ({"schedule": {"kind": "linear", "start": 0.5, "end": 0.2}}, "field 'schedule'", "start < end"),
        ({"schedule": {"kind": "linear", "stop": 1.0}}, "field 'schedule'", "unknown schedule field"),
        ({"schedule": 3}, "field 'schedule'", "must be a kind name"),
        ({"depth_scaling": "quadratic"}, "field 'depth_scaling'", "must be one of 'linear'"),
        (
            {"norm_position": "before_norm"},
            "field 'norm_position'",
            "must be one of 'after_norm', 'after_act'",
        ),
        (
            {"norm_position": "after_act", "sites": "block"},
            "field 'norm_position'",
            "only applies to 'norm' sites",
        ),
        ({"on_conflict": "stak"}, "field 'on_conflict'", "did you mean 'stack'"),
        ({"allow_empty": "yes please"}, "field 'allow_empty'", "must be true or false"),
        ({"label": 7}, "field 'label'", "must be a string"),
        ({"stage": [3]}, "field 'stage'", "did you mean 'stages'"),
        ({"drop_prob": 0.1}, "field 'drop_prob'", "put it under 'params'"),
    ],
)
def test_each_kind_of_error_names_the_rule_and_the_field(fields, where, says):
    regularizer = fields.get("regularizer", "sp_block")
    regularizer = regularizer if isinstance(regularizer, str) else "?"
    message = str(_error(_rule(**fields)))
    assert message.startswith("spec <dict>"), message
    assert f"rule 1 ({regularizer}), {where}: " in message, message
    assert says in message, message


def test_the_documented_stage_override_message_reads_exactly():
    err = _error(_rule(stage_params={3: {"drop_prob": 1.5}}))
    assert (
        str(err)
        == "spec <dict>: rule 1 (sp_block), field 'stage_params.3.drop_prob': must be in [0, 1), got 1.5"
    )
    assert isinstance(err, ValueError)
    (problem,) = err.problems
    assert (problem.rule, problem.field, problem.line) == (
        "rule 1 (sp_block)",
        "stage_params.3.drop_prob",
        None,
    )


def test_spec_error_also_takes_a_single_message():
    err = SpecError("rule 3 (dropblock) matched no site")
    assert str(err) == "rule 3 (dropblock) matched no site" and err.problems[0].message == str(err)


def test_a_missing_regularizer_or_sites_field_is_reported():
    err = _error({"rules": [{"params": {}, "sites": "norm"}, {"regularizer": "sp_block", "params": {}}]})
    text = str(err)
    assert "rule 1 (?), field 'regularizer': is required" in text
    assert "rule 2 (sp_block), field 'sites': is required" in text


def test_depth_scaling_needs_a_strength_parameter():
    assert load_spec(_rule(depth_scaling="linear")).rules[0].depth_scaling == "linear"
    scale = {"regularizer": "sp_scale", "params": {"top_rate": 0.5, "q": 0.3}, "sites": "block"}
    assert load_spec({"rules": [dict(scale, depth_scaling="linear")]}).rules[0].depth_scaling == "linear"
    err = _error({"rules": [{"regularizer": "sp_nostrength", "sites": "block", "depth_scaling": "linear"}]})
    assert "rule 1 (sp_nostrength), field 'depth_scaling': sp_nostrength has no strength parameter" in str(
        err
    )


def test_layerout_is_a_controller_outside_the_registry_and_a_rule_naming_it_says_where_it_belongs():
    import timm_drop

    assert "layerout" not in registry.list_regularizers()
    err = _error({"rules": [{"regularizer": "layerout", "params": {"seed": 1}, "sites": "block"}]})
    assert "rule 1 (layerout), field 'regularizer': 'layerout' is a training controller" in str(err)
    assert "the recipe config's 'layerout:' section" in str(err) and "timm_drop.LayerOut" in str(err)
    assert len(err.problems) == 1  # no follow-up noise about its parameters
    with pytest.raises(KeyError, match="'layerout' is a training controller.*timm_drop.LayerOut"):
        registry.create_regularizer("layerout")
    assert timm_drop.LayerOut(seed=3).seed == 3  # the public class stays


def test_an_error_naming_no_parameter_is_put_on_the_params_field():
    err = _error({"rules": [{"regularizer": "sp_grumpy", "sites": "block"}]})
    assert "rule 1 (sp_grumpy), field 'params': this regularizer refuses to exist" in str(err)


class _Reworded(Regularizer):
    """Words its errors freely: the parameter is named by ParamError.param, not by the message."""

    def __init__(self, drop_prob: float = 0.1, block_size: int = 3) -> None:
        super().__init__()
        if block_size > 5:
            raise ParamError(
                f"a block of {block_size} would swallow small maps; keep the drop_prob low",
                param="block_size",
            )


def test_parameter_errors_are_attributed_by_the_parameter_they_carry_not_by_their_wording():
    registry.register_regularizer("sp_reworded", _Reworded)
    try:
        err = _error(
            {"rules": [{"regularizer": "sp_reworded", "params": {"block_size": 7}, "sites": "block"}]}
        )
        (problem,) = err.problems
        assert problem.field == "params.block_size", str(err)
        assert problem.message == "a block of 7 would swallow small maps; keep the drop_prob low"
        rule = {
            "regularizer": "sp_reworded",
            "sites": "block",
            "stages": [3],
            "stage_params": {3: {"block_size": 9}},
        }
        assert _error({"rules": [rule]}).problems[0].field == "stage_params.3.block_size"
    finally:
        registry._REGISTRY.pop("sp_reworded", None)


@pytest.mark.parametrize(
    "check, args, param, base",
    [
        (check_probability, ("drop_prob", 1.5), "drop_prob", ValueError),
        (check_probability, ("top_rate", "0.2"), "top_rate", TypeError),
        (check_positive_int, ("block_size", 0), "block_size", ValueError),
        (check_positive_int, ("block_size", 2.0), "block_size", TypeError),
    ],
)
def test_the_shared_parameter_checks_raise_param_errors_naming_the_parameter(check, args, param, base):
    with pytest.raises(ParamError) as info:
        check(*args)
    assert info.value.param == param and isinstance(info.value, base)  # callers catching TypeError still do
    assert str(info.value).startswith(f"{param} must be")  # messages unchanged
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries (coverage workers)
    assert type(again) is type(info.value) and again.param == param and str(again) == str(info.value)


def test_exponent_numbers_that_yaml_reads_as_strings_get_a_hint():
    err = _error("rules: [{regularizer: sp_block, params: {drop_prob: 1e-3, block_size: 3}, sites: norm}]")
    assert "field 'params.drop_prob'" in str(err) and "write 1.0e-3" in str(err)
    assert load_spec(
        "rules: [{regularizer: sp_block, params: {drop_prob: 1.0e-3, block_size: 3}, sites: norm}]"
    )


def test_all_problems_of_all_rules_come_in_one_error():
    spec = {
        "rules": [
            {"regularizer": "sp_block", "params": {"drop_prob": 1.5, "block_size": 3}, "sites": "nrom"},
            {"regularizer": "sp_blok", "sites": "norm", "on_conflict": "never"},
            {"regularizer": "sp_scale", "params": {"top_rate": 0.5, "q": 0.2}, "sites": "block"},  # fine
        ],
        "versoin": 1,
    }
    err = _error(spec)
    fields = [(p.rule, p.field) for p in err.problems]
    assert fields == [
        (None, "versoin"),
        ("rule 1 (sp_block)", "params.drop_prob"),
        ("rule 1 (sp_block)", "sites"),
        ("rule 2 (sp_blok)", "regularizer"),
        ("rule 2 (sp_blok)", "on_conflict"),
    ]
    assert str(err).startswith("spec <dict> has 5 problems:\n  - ")
    assert "did you mean 'version'" in str(err)


def test_builtin_regularizers_are_validated_against_their_own_signatures():
    names = [n for n in registry.list_regularizers() if n not in _TEST_REGULARIZERS]
    for name in names:
        err = _error({"rules": [{"regularizer": name, "params": {"bogus_param": 1}, "sites": "block"}]})
        assert f"rule 1 ({name}), field 'params.bogus_param': {name} has no parameter 'bogus_param'" in str(
            err
        )
    if "dropblock" in names:
        err = _error(
            {
                "rules": [
                    {
                        "regularizer": "dropblock",
                        "params": {"drop_prob": 0.1, "block_size": 7},
                        "sites": "norm",
                        "stage_params": {3: {"drop_prob": 1.5}},
                    }
                ]
            }
        )
        assert "rule 1 (dropblock), field 'stage_params.3.drop_prob'" in str(err)


# -- top level ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "src, says",
    [
        ("", "the spec is empty"),
        ("# only a comment\n", "the spec is empty"),
        ("- regularizer: sp_block\n", "put the rules under a 'rules:' key"),
        ("42", "must be a mapping with a 'rules' list"),
        ("version: 1\n", "field 'rules': is required"),
        ("rules: []\n", "field 'rules': is empty"),
        ("rules: {a: {regularizer: sp_block}}\n", "got a mapping without a 'regularizer' key"),
        ("rules: 3\n", "must be a list of rules"),
        ("rules: [3]\n", "rule 1: each rule must be a mapping"),
        (
            "version: 2\nrules: [{regularizer: sp_block, params: {drop_prob: 0.1, block_size: 3}, sites: norm}]",
            "field 'version': unsupported spec version 2",
        ),
        (
            "description: [1]\nrules: [{regularizer: sp_block, params: {drop_prob: 0.1, block_size: 3}, sites: norm}]",
            "field 'description': must be a string",
        ),
        (
            "sites: norm\nrules: [{regularizer: sp_block, params: {drop_prob: 0.1, block_size: 3}, sites: norm}]",
            "rule fields go inside an entry of the 'rules' list",
        ),
    ],
)
def test_malformed_top_levels_are_errors(src, says):
    err = _error(src)
    assert str(err).startswith("spec <string>") and says in str(err), str(err)


def test_load_spec_refuses_other_types():
    assert "not int" in str(_error(3))  # type: ignore[arg-type]


# -- sources: paths vs YAML text, line numbers --------------------------------------------------------------
def test_paths_and_yaml_text_are_told_apart(tmp_path: pathlib.Path):
    f = tmp_path / "spec.yaml"
    f.write_text(FULL)
    assert load_spec(str(f)).source == str(f)
    assert load_spec(f).source == str(f)  # PathLike
    no_suffix = tmp_path / "spec_without_suffix"
    no_suffix.write_text(FULL)
    assert load_spec(str(no_suffix)).rules == load_spec(FULL).rules
    assert load_spec(FULL).source == "<string>" and load_spec(yaml.safe_load(FULL)).source == "<dict>"


@pytest.mark.parametrize("name", ["missing.yaml", "missing.yml", "sub/missing.YAML"])
def test_a_missing_yaml_path_is_an_error_naming_the_path(tmp_path: pathlib.Path, name):
    path = str(tmp_path / name)
    err = _error(path)
    assert err.source == path and f"spec file {path!r} does not exist" in str(err)


def test_a_word_that_is_neither_a_file_nor_yaml_says_so(tmp_path: pathlib.Path):
    err = _error(str(tmp_path / "specs" / "dropblock"))
    assert "is neither an existing file nor YAML text" in str(err)
    assert "is a directory" in str(_error(str(tmp_path)))


def test_an_empty_file_is_an_error_naming_the_file(tmp_path: pathlib.Path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert str(_error(f)) == f"spec {f}: the spec is empty; it needs a 'rules' list"


def test_yaml_syntax_errors_carry_file_line_and_column(tmp_path: pathlib.Path):
    f = tmp_path / "broken.yaml"
    f.write_text("rules:\n  - regularizer: sp_block\n    sites: [norm\n    params: {drop_prob: 0.1}\n")
    err = _error(f)
    assert str(err).startswith(f"spec {f}, line ") and "YAML syntax error" in str(err)
    (problem,) = err.problems
    assert problem.line == 4 and problem.column is not None
    bad_indent = _error("rules:\n  - regularizer: sp_block\n   sites: norm\n")
    assert bad_indent.problems[0].line == 3 and "column" in str(bad_indent)
    two_docs = _error("rules: []\n---\nrules: []\n")
    assert "line 2" in str(two_docs) and "single document" in str(two_docs)


def test_validation_errors_in_yaml_carry_the_line_of_the_field(tmp_path: pathlib.Path):
    text = textwrap.dedent(
        """\
        rules:
          - regularizer: sp_block
            params: {drop_prob: 0.1, block_size: 3}
            sites: norm
          - regularizer: sp_block
            params:
              drop_prob: 0.1
              block_size: 3
            sites: norm
            stage_params:
              "3":
                drop_prob: 1.5
            name: "re:("
            stages: [1, 3, 0]
            stag: 3
        """
    )
    f = tmp_path / "s.yml"
    f.write_text(text)
    err = _error(f)
    lines = {p.field: p.line for p in err.problems}
    assert lines == {"stage_params.3.drop_prob": 12, "name": 13, "stages[2]": 14, "stag": 15}
    assert (
        f"spec {f} has 4 problems:\n  - line 12: rule 2 (sp_block), field 'stage_params.3.drop_prob'"
        in str(err)
    )


def test_duplicate_yaml_keys_are_errors_not_silently_dropped():
    err = _error(
        "rules:\n  - regularizer: sp_block\n    params: {drop_prob: 0.1, block_size: 3}\n    sites: norm\n"
        "    params: {drop_prob: 0.2, block_size: 3}\n"
    )
    (problem,) = err.problems
    assert (problem.rule, problem.field, problem.line) == ("rule 1 (sp_block)", "params", 5)
    assert "appears twice" in str(err)


# -- resource bounds: hostile YAML is refused before it costs time or memory -------------------------------
def _alias_bomb(levels: int = 9) -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefghijklmnop", "bcdefghijklmnop"[: levels - 1]):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("rules: [{regularizer: sp_block, params: {drop_prob: 0.1, block_size: 3}, sites: norm}]")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(20)  # the unbounded walk took ~100 s of CPU; a bounded one takes milliseconds
def test_a_yaml_alias_bomb_is_refused_before_anything_expands_it():
    bomb = _alias_bomb()
    assert len(bomb.encode()) < 500  # 9 levels of 9 aliases each: 9**9 leaves when expanded
    err = _error(bomb)
    assert len(err.problems) == 1, str(err)
    text = str(err)
    assert text.startswith("spec <string>, line ") and "aliases included" in text
    assert f"more than {MAX_YAML_NODES} YAML nodes" in text, text


def test_a_yaml_alias_that_contains_itself_is_refused():
    err = _error(
        "x: &x [1, *x]\nrules: [{regularizer: sp_block, params: {drop_prob: 0.1, block_size: 3}, sites: norm}]"
    )
    assert "recursive alias (a node that contains itself)" in str(err) and "line 1" in str(err)


def test_yaml_nested_deeper_than_the_limit_is_an_error_naming_the_line_not_a_recursion_crash():
    err = _error("x: " + "[" * 1000 + "]" * 1000 + "\nrules: []\n")
    assert f"nested too deeply: more than {MAX_YAML_DEPTH} levels" in str(err) and "line 1" in str(err)
    deep = "rules: []\nx: " + "[" * (MAX_SPEC_BYTES // 2 - 20) + "]" * (MAX_SPEC_BYTES // 2 - 20)
    assert "nested too deeply" in str(_error(deep))
    nested_ok = "x: " + "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1) + "\n" + _alias_bomb(1)
    assert "nested too deeply" not in str(_error(nested_ok))  # fails on the unknown key 'x', not on depth


def test_plain_yaml_with_more_nodes_than_the_limit_is_refused(monkeypatch):
    import timm_drop.spec

    monkeypatch.setattr(
        timm_drop.spec, "MAX_YAML_NODES", 500
    )  # the real limit, made small: parsing costs time
    zeros = ", ".join(["0"] * 500)
    err = _error(
        f"rules: [{{regularizer: sp_block, params: {{drop_prob: 0.1, block_size: 3, x: [{zeros}]}}}}]"
    )
    assert "more than 500 YAML nodes" in str(err) and len(err.problems) == 1
    assert MAX_YAML_NODES >= 20 * MAX_RULES  # the default leaves room for the largest allowed spec


@pytest.mark.timeout(60)  # unbounded: 216 s and 6.2 GB for the 50 MB spec of issue 7
def test_a_spec_larger_than_the_size_limit_is_refused_unparsed(tmp_path: pathlib.Path):
    rule = "  - {regularizer: sp_block, params: {drop_prob: 0.1, block_size: 3}, sites: norm}\n"
    huge = "rules:\n" + rule * (50_000_000 // len(rule))
    err = _error(huge)
    assert f"over the limit of {MAX_SPEC_BYTES} bytes" in str(err) and len(err.problems) == 1
    f = tmp_path / "huge.yaml"
    f.write_text("rules:\n" + rule + "#" * MAX_SPEC_BYTES + "\n")
    err = _error(f)
    assert str(err).startswith(f"spec {f}: ") and f"over the limit of {MAX_SPEC_BYTES} bytes" in str(err)


@pytest.mark.parametrize("form", ["dict", "yaml"])
def test_a_spec_with_more_rules_than_the_limit_is_refused_in_one_problem(form):
    rule = {"regularizer": "sp_block", "params": {"drop_prob": 0.1, "block_size": 3}, "sites": "norm"}
    data = {"rules": [rule] * (MAX_RULES + 1)}
    src = data if form == "dict" else yaml.safe_dump(data, default_flow_style=True, width=10**9)
    err = _error(src)
    assert len(err.problems) == 1
    assert f"field 'rules': has {MAX_RULES + 1:,} rules, more than the limit of {MAX_RULES:,}" in str(err)
    assert len(load_spec({"rules": [rule] * 3})) == 3


@pytest.mark.parametrize(
    "regularizer, params, field",
    [
        ("attentiondrop", {"drop_prob": 0.1, "top_rate": 0.2, "mode": "soft"}, "params.mode"),
        ("dropblock", {"drop_prob": 0.1, "block_size": 3, "per_channel": "yes"}, "params.per_channel"),
        ("selectout", {"drop_prob": 0.1, "top_rate": 0}, "params.top_rate"),
    ],
)
def test_built_in_parameter_errors_land_on_their_field(regularizer, params, field):
    err = _error({"rules": [{"regularizer": regularizer, "params": params, "sites": "block"}]})
    assert [p.field for p in err.problems] == [field], str(err)
