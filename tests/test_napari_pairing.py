"""First guesses of the Register widget's pickers (pure functions over layer names, no Qt)."""

from __future__ import annotations

from napari_unireg._napari.pairing import choose_pair, labels_for, role_of


def test_roles_from_names():
    assert role_of("demo fixed") == "fixed"
    assert role_of("mni_icbm152_template.nii.gz") == "fixed"
    assert role_of("Atlas") == "fixed"
    assert role_of("demo moving") == "moving"
    assert role_of("sub01_T1w") is None
    assert role_of("warped [demo moving→demo fixed, dp-vfa]") is None  # both words: no role


def test_pair_prefers_names_and_never_repeats():
    assert choose_pair(["demo fixed", "demo moving"]) == (0, 1)
    assert choose_pair(["demo moving", "demo fixed"]) == (1, 0)  # names win over the order
    assert choose_pair(["scan", "template"]) == (1, 0)
    assert choose_pair(["a", "b", "c"]) == (1, 2)  # the two most recently added, the older as fixed
    assert choose_pair(["a"]) == (0, None)
    assert choose_pair([]) == (None, None)
    # a kept pick stays; the other never repeats it
    assert choose_pair(["demo fixed", "demo moving"], fixed=0, moving=0) == (0, 1)
    assert choose_pair(["a", "b", "c"], fixed=2) == (2, 1)
    assert choose_pair(["fixed", "x", "y"], moving=0) == (2, 0)
    for names in (["x"], ["x", "y"], ["fixed", "fixed 2"], ["moving", "moving 2"], ["a", "fixed", "b"]):
        f, m = choose_pair(names)
        assert f is None or f != m, names


def test_labels_follow_their_image():
    labels = ["demo fixed labels", "demo moving labels"]
    assert labels_for("demo fixed", labels) == 0
    assert labels_for("demo moving", labels) == 1
    assert labels_for("fixed", ["moving seg", "fixed seg"]) == 1
    assert labels_for("sub01_T1w", ["sub02_T1w_dseg", "sub01_T1w_dseg"]) == 1
    assert labels_for("my template", ["aseg of the fixed"]) == 0  # same role word
    assert labels_for("scan", ["demo fixed labels"]) is None
    assert labels_for("demo fixed", []) is None
