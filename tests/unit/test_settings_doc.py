"""The README's configuration table is the one the settings classes generate, and it names every variable
each class reads (so a new setting cannot go undocumented)."""

from __future__ import annotations

from cli.settings_doc import BEGIN, END, README, SERVICES, readme_with_table, table
from shared.settings import env_name
from shared.topics import TopicSettings


def test_the_readme_table_is_the_generated_one():
    text = README.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert readme_with_table(text) == text, "run `billing settings-doc --write` and commit README.md"


def test_the_table_names_every_variable_of_every_settings_class():
    generated = table()
    for svc, cls in SERVICES.items():
        for name in cls.model_fields:
            var = env_name(cls, name)
            shared = var.replace(svc.upper() + "_", "<SVC>_", 1)
            assert f"| `{var}` |" in generated or f"| `{shared}` |" in generated, var
    for name in TopicSettings.model_fields:
        assert f"| `{env_name(TopicSettings, name)}` |" in generated


def test_every_production_requirement_shows_as_required():
    generated = table().splitlines()
    for cls in [*SERVICES.values(), TopicSettings]:
        for name in cls.PRODUCTION_REQUIRED:
            var = env_name(cls, name)
            rows = [r for r in generated if r.startswith((f"| `{var}` |", f"| `<SVC>_{var.split('_', 1)[1]}` |"))]
            assert rows and "**required**" in rows[0], var
