"""`hvctl apply FILE`: a spec file becomes guests, created and started together; --wait prints their statuses."""
import json





def test_apply_a_toml_fleet_and_wait_for_it(sup, build_guest, tmp_path):
    image = build_guest("mov $0x3f8, %dx\nmov $'k', %al\nout %al, %dx\nmov $0x501, %dx\nmov $3, %al\n"
                        "out %al, %dx\n1: jmp 1b\n")
    spec = tmp_path / "fleet.toml"
    spec.write_text(f'[defaults]\nkernel = "{image}"\nboot = "raw64"\nmem = "8M"\ntimeout = 30\n\n'
                    '[[guest]]\nname = "w"\ncount = 12\n\n[[guest]]\nname = "solo"\nvcpus = 2\n')
    r = sup.hvctl("apply", spec, "--wait", timeout=120, check=3)          # every guest exits 3
    assert "13 guest(s) created and started" in r.stdout
    rows = [line.split()[:2] for line in r.stdout.splitlines()[2:]]
    assert sorted(rows) == sorted([[f"w-{i}", "3"] for i in range(12)] + [["solo", "3"]])
    assert sup.info("solo")["vcpus"] == 2
    r = sup.hvctl("apply", spec, check=2)                                # names taken: refused, nothing made
    assert "already exists" in r.stderr
    assert len(json.loads(sup.hvctl("list", "--json", check=0).stdout)) == 13
    sup.hvctl("destroy", "--all", check=0)
    assert json.loads(sup.hvctl("list", "--json", check=0).stdout) == []


def test_bad_specs_are_refused_with_one_line(sup, tmp_path):
    for text, words in (("[[guest]]\n", "needs a name"), ("x = 1\n[[guest]]\nname='a'\n", "top level"),
                        ("[[guest]]\nname = 'a'\n", "no kernel"), ("[[guest]\n", "not a valid spec"),
                        ("[[guest]]\nname = 'a'\ncount = 0\nkernel = '/bin/sh'\n", "count"),
                        ("[[guest]]\nname = 'a'\nkernel = '/bin/sh'\nmem = 'lots'\n", "--mem")):
        spec = tmp_path / "s.toml"
        spec.write_text(text)
        r = sup.hvctl("apply", spec, check=2)
        assert words in r.stderr and len(r.stderr.splitlines()) == 1, (text, r.stderr)
    assert json.loads(sup.hvctl("list", "--json", check=0).stdout) == []
