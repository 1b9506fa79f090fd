"""The Windows MSI, built here with wixl and read back with msiinfo (Debian: wixl, msitools).

Nothing here installs the MSI (that needs Windows); these tests read the tables Windows
Installer acts on. wixl and msiinfo are hard requirements: missing, the tests fail with the
command to install them, never skip. The build downloads the Windows wheels once per run
through pip (from the configured package index).
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from agent import winservice
from installer.windows import build_msi

INSTALL_HINT = "apt-get install -y wixl msitools (Debian 12 ships wixl as its own package)"


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is missing: {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="module")
def msi(tmp_path_factory) -> Path:
    _require("wixl")
    _require("msiinfo")
    root = tmp_path_factory.mktemp("msi")
    return build_msi.build(root / "dist", wheelhouse=root / "wheelhouse")


def table(msi: Path, name: str) -> list[dict[str, str]]:
    """Rows of one MSI table as dicts keyed by column name."""
    done = subprocess.run([_require("msiinfo"), "export", str(msi), name], capture_output=True,
                          text=True, check=True)
    lines = done.stdout.split("\r\n") if "\r\n" in done.stdout else done.stdout.splitlines()
    columns = lines[0].split("\t")
    return [dict(zip(columns, line.split("\t"), strict=False)) for line in lines[3:] if line]


def installed_paths(msi: Path) -> dict[str, str]:
    """Map each file's full target path (under the root folder ids) to its component."""
    dirs = {row["Directory"]: row for row in table(msi, "Directory")}

    def path_of(ident: str) -> str:
        row = dirs[ident]
        name = row["DefaultDir"].split("|")[-1].split(":")[-1]
        if not row["Directory_Parent"] or row["Directory_Parent"] == "TARGETDIR":
            return ident
        return f"{path_of(row['Directory_Parent'])}/{name}"

    components = {row["Component"]: row for row in table(msi, "Component")}
    out = {}
    for row in table(msi, "File"):
        directory = components[row["Component_"]]["Directory_"]
        out[f"{path_of(directory)}/{row['FileName'].split('|')[-1]}"] = row["Component_"]
    return out


def sequence(msi: Path) -> dict[str, int]:
    return {row["Action"]: int(row["Sequence"]) for row in table(msi, "InstallExecuteSequence")}


# ---------------------------------------------------------------- product


def test_the_msi_is_named_after_the_project_version(msi):
    assert msi.name == f"tillsync-{build_msi.project_version()}.msi"
    assert msi.stat().st_size > 1_000_000


def test_the_product_version_matches_pyproject(msi):
    properties = {row["Property"]: row["Value"] for row in table(msi, "Property")}
    assert properties["ProductVersion"] == build_msi.msi_version(build_msi.project_version())
    assert properties["ProductName"] == "tillsync"
    assert properties["ALLUSERS"] == "1"


def test_msi_versions_keep_the_first_three_numbers():
    assert build_msi.msi_version("0.1.0") == "0.1.0"
    assert build_msi.msi_version("1.2") == "1.2.0"
    assert build_msi.msi_version("1.2.3.dev4") == "1.2.3"
    with pytest.raises(build_msi.BuildError):
        build_msi.msi_version("dev")


# ---------------------------------------------------------------- service


def test_the_service_is_installed_for_automatic_start_as_local_service(msi):
    [row] = table(msi, "ServiceInstall")
    assert row["Name"] == winservice.SERVICE_NAME
    assert row["StartType"] == "2"  # SERVICE_AUTO_START
    assert row["ServiceType"] == "16"  # SERVICE_WIN32_OWN_PROCESS
    assert row["ErrorControl"] == "1"
    assert row["StartName"] == winservice.SERVICE_ACCOUNT
    assert row["DisplayName"] == winservice.DISPLAY_NAME
    assert row["Description"] == winservice.DESCRIPTION


def test_the_service_executable_is_pythonservice_under_program_files(msi):
    [row] = table(msi, "ServiceInstall")
    components = {c["Component"]: c for c in table(msi, "Component")}
    key_file = components[row["Component_"]]["KeyPath"]
    paths = {component: path for path, component in installed_paths(msi).items()}
    files = {f["File"]: f for f in table(msi, "File")}
    assert files[key_file]["FileName"].split("|")[-1] == "pythonservice.exe"
    expected = "ProgramFiles64Folder/tillsync/" + winservice.SERVICE_EXE.replace("\\", "/")
    assert paths[row["Component_"]] == expected


def test_uninstall_stops_and_removes_the_service_and_install_starts_it(msi):
    [row] = table(msi, "ServiceControl")
    assert row["Name"] == winservice.SERVICE_NAME
    event = int(row["Event"])
    assert event & 0x001  # start on install
    assert event & 0x002 and event & 0x020  # stop on install (upgrade) and on uninstall
    assert event & 0x080  # remove on uninstall
    assert not event & 0x008  # never remove on install
    assert row["Wait"] == "1"


def test_pythonservice_is_pointed_at_the_agent_service_class(msi):
    registry = table(msi, "Registry")
    [python_class] = [r for r in registry if r["Key"].endswith(r"Services\tillsync\PythonClass")]
    assert python_class["Root"] == "2"  # HKLM
    assert python_class["Name"] == ""
    assert python_class["Value"] == winservice.python_class("[INSTALLDIR]")
    [environment] = [r for r in registry if r["Name"] == "Environment"]
    variables = dict(v.split("=", 1) for v in environment["Value"].split("[~]"))
    assert variables["PYTHONHOME"] == "[PYTHONDIR]"
    assert variables["PYTHONPATH"].split(";")[0] == "[INSTALLDIR]lib"
    assert "[INSTALLDIR]lib\\pywin32_system32" in variables["PATH"].split(";")


# ---------------------------------------------------------------- files and folders


def test_the_agent_and_its_windows_dependencies_are_installed_under_program_files(msi):
    paths = set(installed_paths(msi))
    lib = "ProgramFiles64Folder/tillsync/lib"
    for rel in ["agent/winservice.py", "agent/runtime.py", "outbox/__init__.py",
                "drivers/__init__.py", "agent/openapi.json",
                "win32/servicemanager.pyd", "win32/lib/win32serviceutil.py",
                "pywin32_system32/pywintypes311.dll"]:
        assert f"{lib}/{rel}" in paths, rel
    assert any(p.startswith(f"{lib}/pydantic_core/") and p.endswith(".pyd") for p in paths)
    assert any(p.startswith(f"{lib}/cryptography/") and p.endswith(".pyd") for p in paths)
    assert any(PurePosixPath(p).parent.name.startswith("tillsync-")
               and p.endswith(".dist-info/entry_points.txt") for p in paths)
    code = [p for p in paths if ".dist-info/" not in p]  # dist-info keeps every license
    assert not any(f"{lib}/pythonwin/" in p or "/__pycache__/" in p for p in code)
    assert f"{lib}/pywin32-312.dist-info/licenses/pythonwin/License.txt" in paths or any(
        "pywin32-" in p and "/licenses/" in p for p in paths)
    assert not any(p.startswith(f"{lib}/tests/") for p in paths)


def test_config_and_logs_folders_are_created_under_programdata(msi):
    dirs = {row["Directory"]: row for row in table(msi, "Directory")}
    assert dirs["DATADIR"]["Directory_Parent"] == "CommonAppDataFolder"
    assert dirs["DATADIR"]["DefaultDir"] == "tillsync"
    assert dirs["LOGDIR"]["Directory_Parent"] == "DATADIR"
    assert dirs["LOGDIR"]["DefaultDir"] == "logs"
    created = {row["Directory_"] for row in table(msi, "CreateFolder")}
    assert {"DATADIR", "LOGDIR"} <= created
    # Data is never an MSI file, so uninstall cannot delete config, key or queue.
    assert not any(p.startswith("CommonAppDataFolder") for p in installed_paths(msi))


def test_the_data_acl_is_set_as_localsystem_before_any_file_is_installed(msi):
    actions = {row["Action"]: row for row in table(msi, "CustomAction")}
    acl = actions["SetDataAcl"]
    assert int(acl["Type"]) == 50 | 0x400 | 0x800  # exe from property, deferred, no impersonate
    assert acl["Source"] == "ICACLS_EXE"
    assert acl["Target"] == winservice.msi_command_line(winservice.acl_command("[DATADIR]."))
    assert actions["SetIcaclsExe"]["Target"] == "[SystemFolder]icacls.exe"
    order = sequence(msi)
    assert order["SetIcaclsExe"] < order["InstallInitialize"]
    assert order["CreateFolders"] < order["SetDataAcl"] < order["InstallFiles"]


def test_service_recovery_is_configured_between_install_and_start(msi):
    actions = {row["Action"]: row for row in table(msi, "CustomAction")}
    targets = [actions["SetRecovery"]["Target"], actions["SetRecoveryFlag"]["Target"]]
    assert targets == [winservice.msi_command_line(c) for c in winservice.recovery_commands()]
    assert actions["SetScExe"]["Target"] == "[SystemFolder]sc.exe"
    order = sequence(msi)
    assert order["InstallServices"] < order["SetRecovery"] < order["SetRecoveryFlag"]
    assert order["SetRecoveryFlag"] < order["StartServices"]
    assert order["SetScExe"] < order["InstallInitialize"]
    conditions = {row["Action"]: row["Condition"] for row in
                  table(msi, "InstallExecuteSequence")}
    assert conditions["SetRecovery"] == conditions["SetDataAcl"] == 'NOT REMOVE~="ALL"'


# ---------------------------------------------------------------- properties, upgrade, python


def test_silent_install_properties_are_stored_for_the_first_start(msi):
    values = {r["Name"]: r["Value"] for r in table(msi, "Registry")
              if r["Key"] == winservice.SETUP_KEY}
    assert values == {"StoreId": "[STORE_ID]", "Listen": "[LISTEN]", "SinkUrl": "[SINK_URL]"}


def test_an_upgrade_removes_the_old_version_before_installing_the_new_one(msi):
    order = sequence(msi)
    assert order["InstallInitialize"] < order["RemoveExistingProducts"]
    assert order["RemoveExistingProducts"] < order["ProcessComponents"]
    upgrade = table(msi, "Upgrade")
    assert {row["ActionProperty"] for row in upgrade} == {"WIX_UPGRADE_DETECTED",
                                                         "WIX_DOWNGRADE_DETECTED"}


def test_install_refuses_to_start_without_python_311(msi):
    [locator] = table(msi, "RegLocator")
    assert locator["Key"] == r"SOFTWARE\Python\PythonCore\3.11\InstallPath"
    assert locator["Root"] == "2"
    assert int(locator["Type"]) & 0x10  # 64-bit registry view
    assert {r["Property"] for r in table(msi, "AppSearch")} == {"PYTHONDIR"}
    conditions = {row["Condition"]: row["Description"] for row in table(msi, "LaunchCondition")}
    assert "Python 3.11 (64-bit)" in conditions["Installed OR PYTHONDIR"]


# ---------------------------------------------------------------- the build script


def test_a_missing_wixl_fails_the_build_with_the_install_command(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(build_msi.BuildError, match="apt-get install -y wixl"):
        build_msi.find_wixl()


def test_unpacking_keeps_packages_and_drops_ides_tests_and_scripts(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in ["pkg/__init__.py", "pkg/tests/test_x.py", "pkg/__pycache__/a.pyc",
                     "pythonwin/x.py", "demo-1.0.dist-info/METADATA",
                     "demo-1.0.data/platlib/native.pyd", "demo-1.0.data/scripts/run.py"]:
            archive.writestr(name, "x")
    build_msi.unpack_wheels([wheel], tmp_path / "lib")
    found = sorted(p.relative_to(tmp_path / "lib").as_posix()
                   for p in (tmp_path / "lib").rglob("*") if p.is_file())
    assert found == ["demo-1.0.dist-info/METADATA", "native.pyd", "pkg/__init__.py"]


def test_a_wheel_with_a_path_outside_the_target_is_refused(tmp_path):
    wheel = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("../escape.py", "x")
    with pytest.raises(build_msi.BuildError, match="unsafe path"):
        build_msi.unpack_wheels([wheel], tmp_path / "lib")
