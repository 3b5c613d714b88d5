"""Static checks of the source: no pickle of our data, weights-only model loading, no
pickle-enabled numpy loading.  (The embedded Ray's loopback binding is checked on a live run
in tests/test_driver_kill.py.)"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "actors", "replay", "learner", "driver", "deploy")


def _sources():
    files = [ROOT / "main.py"]
    for pkg in PACKAGES:
        files += sorted((ROOT / pkg).rglob("*.py"))
    files += sorted((ROOT / "tests").rglob("*.py"))
    return [f for f in files if f.exists()]


def _calls(tree, attr: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == attr:
            yield node


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name and isinstance(k.value, ast.Constant):
            return k.value.value
    return None


def test_no_pickle_modules_in_the_project():
    bad = []
    for f in _sources():
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in ("pickle", "cloudpickle", "dill", "marshal", "shelve"):
                    bad.append(f"{f.relative_to(ROOT)}:{node.lineno} imports {n}")
    assert not bad, bad


def test_every_torch_load_is_weights_only():
    bad = []
    for f in _sources():
        tree = ast.parse(f.read_text(), str(f))
        for call in _calls(tree, "load"):
            owner = call.func.value
            if isinstance(owner, ast.Name) and owner.id == "torch" \
                    and _kw(call, "weights_only") is not True:
                bad.append(f"{f.relative_to(ROOT)}:{call.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_numpy_never_loads_pickles():
    bad = []
    for f in _sources():
        tree = ast.parse(f.read_text(), str(f))
        for call in _calls(tree, "load"):
            owner = call.func.value
            if isinstance(owner, ast.Name) and owner.id in ("np", "numpy") \
                    and _kw(call, "allow_pickle") is not False:
                bad.append(f"{f.relative_to(ROOT)}:{call.lineno}")
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and _kw(call, "allow_pickle") is True:
                bad.append(f"{f.relative_to(ROOT)}:{call.lineno} allow_pickle=True")
    assert not bad, bad
