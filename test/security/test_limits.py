"""Every query and vocabulary input is bounded and checked in sas_core (the node and the CLI share
the checks); each refusal names the limit it hit and echoes at most a clipped piece of the input."""

import numpy as np
import pytest

from sas_core.mapping import Mapper, MapperConfig, Rejected, ServiceLimits
from sas_core.text import check_template, check_vocabulary, clip_text, get_templates


@pytest.fixture(scope="module")
def mapper():
    from sas_core.data.synthetic import SynthConfig, generate_scene

    scene = generate_scene(SynthConfig(seed=3, n_frames=2, with_lidar=False))
    m = Mapper(MapperConfig(mode="fusion", query_max_points=500), limits=ServiceLimits(max_query_texts=4, max_text_length=50,
                                                                 max_query_points=1000, max_vocabulary=30))
    for f in scene.frames:
        m.integrate_rgbd(f)
    m.label_pass(full=True)
    return m


@pytest.mark.parametrize("template", ["{}{}{}", "{:>50000000}", "{!r}", "{0}", "{name}", "{{}}", "a {} {{x}}",
                                      "no slot", "}{", "{} {", 7])
def test_bad_templates_are_refused(template):
    with pytest.raises(ValueError, match="exactly one|must be a string"):
        check_template(template)


def test_good_templates_and_the_cli_share_the_check():
    assert check_template("a {} in a scene") == "a {} in a scene"
    assert get_templates(["a photo of a {}.", "{}"]) == ("a photo of a {}.", "{}")
    with pytest.raises(ValueError, match="exactly one"):
        get_templates(["a {} and {:>9}"])
    with pytest.raises(ValueError, match="limit of 200"):
        check_template("{}" + "x" * 300)


def test_vocabulary_bounds_and_duplicates():
    assert check_vocabulary([" chair ", "", "table"]) == ("chair", "table")
    with pytest.raises(ValueError, match=r"duplicate.*'chair' x2"):
        check_vocabulary(["chair", "Chair ", "table"])
    with pytest.raises(ValueError, match=r"5000 duplicate.*'chair' x5001$"):
        check_vocabulary(["chair"] * 5001)
    with pytest.raises(ValueError, match=r"12 duplicate.* and 2 more$"):
        check_vocabulary([f"c{i}" for i in range(12)] * 2)
    with pytest.raises(ValueError, match="limit of 10 .max_vocabulary"):
        check_vocabulary([f"c{i}" for i in range(11)], max_names=10)
    with pytest.raises(ValueError, match="limit of 8 characters") as e:
        check_vocabulary(["x" * 10 ** 6], max_length=8)
    assert len(str(e.value)) < 300
    assert clip_text("abcdef", 3) == "abc..." and clip_text("abc", 3) == "abc"


@pytest.mark.parametrize("args,reason,text", [
    ((["chair"] * 5,), "over_limit", "limit of 4 (max_query_texts)"),
    ((["x" * 51],), "over_limit", "limit of 50 (max_text_length)"),
    ((["x" * 10 ** 6],), "over_limit", "limit of 50 (max_text_length)"),
    ((["chair"], float("nan")), "bad_request", "finite number in [-1, 1]"),
    ((["chair"], float("inf")), "bad_request", "finite number in [-1, 1]"),
    ((["chair"], -1.5), "bad_request", "finite number in [-1, 1]"),
    ((["chair"], 1.5), "bad_request", "finite number in [-1, 1]"),
    ((["chair"], None, 1001), "over_limit", "limit of 1000 (max_query_points)"),
    ((["chair"], None, 2 ** 32 - 1), "over_limit", "limit of 1000 (max_query_points)"),
    ((["chair"], None, -1), "bad_request", "integer >= 0"),
    (([],), "empty_query", "empty query"),
    ((["  "],), "empty_query", "empty query"),
])
def test_bad_queries_are_refused_naming_the_limit(mapper, args, reason, text):
    with pytest.raises(Rejected) as e:
        mapper.query(*args)
    assert e.value.reason == reason and text in str(e.value)
    assert len(str(e.value)) < 400  # never an echo of the whole input


def test_query_max_points_zero_means_the_cap(mapper):
    a = mapper.query(["wall"], threshold=-1.0, max_points=0)[0]
    assert a.count > 1000 and len(a.slots) == 1000  # 0: as many as max_query_points allows
    assert len(mapper.query(["wall"], threshold=-1.0, max_points=7)[0].slots) == 7
    assert mapper.query(["wall"], threshold=1.0)[0].count == 0


def test_bad_vocabularies_are_refused_and_all_unknown_names_reported(mapper):
    before = list(mapper.vocabulary)
    for names, template, reason, text in [
        (["chair", "CHAIR"], None, "bad_vocabulary", "duplicate"),
        ([f"c{i}" for i in range(31)], None, "bad_vocabulary", "limit of 30 (max_vocabulary)"),
        (["x" * 10 ** 6], None, "bad_vocabulary", "limit of 50 characters"),
        (["chair"], "{}{}{}", "bad_template", "exactly one"),
        (["chair"], "{:>50000000}", "bad_template", "exactly one"),
    ]:
        with pytest.raises(Rejected) as e:
            mapper.set_vocabulary(names, template)
        assert e.value.reason == reason and text in str(e.value) and len(str(e.value)) < 400
    unknown = [f"zork{i}" for i in range(25)] + ["y" * 45]
    with pytest.raises(Rejected) as e:
        mapper.set_vocabulary(["chair"] + unknown)
    assert e.value.reason == "unknown_word" and "26 name(s)" in str(e.value) and "and 16 more" in str(e.value)
    assert len(e.value.words) == 26 and e.value.words[-1] == "y" * 45
    assert mapper.vocabulary == before  # unchanged after every refusal
    assert mapper.set_vocabulary(["chair", "table"])


def test_the_limits_themselves_are_checked():
    with pytest.raises(ValueError, match="max_query_texts"):
        ServiceLimits(max_query_texts=0)
    with pytest.raises(ValueError, match="query_max_points"):
        Mapper(MapperConfig(mode="none", query_max_points=5000), limits=ServiceLimits(max_query_points=100))
    with pytest.raises(ValueError, match="prompt_template"):
        Mapper(MapperConfig(mode="none", prompt_template="{:>99}"))
    assert np.isfinite(ServiceLimits().max_query_points)
