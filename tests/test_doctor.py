"""`python -m esnb doctor` says only what it checked, and fails only on what the Quickstart needs."""
from esnb import doctor


def test_marks_say_what_was_checked():
    assert doctor.Check("a", True, "").mark == "ok"
    assert doctor.Check("a", False, "").mark == "MISSING"
    assert doctor.Check("a", False, "", needed=False).mark == "optional"
    assert doctor.Check("a", True, "", checked=False).mark == "not checked"


def test_the_hub_is_never_reported_ok():
    [hub] = [c for c in doctor.model_checks() if "<hub id>" in c.what]
    assert hub.mark == "not checked" and "not checked" in hub.detail


def test_exit_status_follows_what_the_quickstart_needs(monkeypatch, capsys):
    monkeypatch.setattr(doctor, "model_checks", lambda: [])
    monkeypatch.setattr(doctor, "browser_checks",
                        lambda: [doctor.Check("chromium", False, "not found", "apt-get ...", needed=False)])
    assert doctor.main() == 0
    out = capsys.readouterr().out
    assert "optional" in out and "everything the Quickstart needs is here" in out
    monkeypatch.setattr(doctor, "PACKAGES", doctor.PACKAGES + [("no-such-dist-esnb", "no_such_module_esnb", "a test")])
    assert doctor.main() == 1
    out = capsys.readouterr().out
    assert "MISSING     no-such-dist-esnb" in out and "missing: no-such-dist-esnb" in out


def test_the_checks_cover_the_notebook_front_end():
    names = {c.what for c in doctor.check_environment(include_models=False, include_browser=True)}
    assert {"jupyterlab", "ipykernel", "widgets front end", "chromium", "chromedriver"} <= names
