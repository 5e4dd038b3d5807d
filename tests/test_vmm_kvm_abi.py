"""The ctypes mirror of linux/kvm.h must match the real header, or every ioctl lies."""

import ctypes
import subprocess

from appliance.vmm import kvm

# Names in kvm.py that are ours, not the header's.
_OWN_NAMES = {"KVM_API_VERSION"}
# kvm.py mirrors only the head of struct kvm_run: check field offsets instead of size.
_KVM_RUN_FIELDS = {"immediate_exit": "immediate_exit", "exit_reason": "exit_reason", "exit": "io"}


def _header_values(tmp_path):
    names = [n for n in dir(kvm) if n.startswith("KVM_") and n not in _OWN_NAMES]
    structs = [n for n in dir(kvm) if n.startswith("kvm_") and isinstance(getattr(kvm, n), type)
               and n != "kvm_run"]
    lines = ["#include <linux/kvm.h>", "#include <stdio.h>", "int main(void) {"]
    lines += [f'printf("{n} %llu\\n", (unsigned long long)({n}));' for n in names]
    lines += [f'printf("{s} %zu\\n", sizeof(struct {s}));' for s in structs]
    lines += [f'printf("kvm_run.{ours} %zu\\n", __builtin_offsetof(struct kvm_run, {theirs}));'
              for ours, theirs in _KVM_RUN_FIELDS.items()]
    lines.append("return 0; }")
    source = tmp_path / "abi.c"
    source.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(tmp_path / "abi"), str(source)], check=True)
    output = subprocess.run([str(tmp_path / "abi")], check=True, capture_output=True, text=True).stdout
    return dict((k, int(v)) for k, v in (line.split() for line in output.splitlines()))


def test_constants_and_struct_sizes_match_linux_header(tmp_path):
    header = _header_values(tmp_path)
    mismatches = []
    for name, value in header.items():
        if name.startswith("kvm_run."):
            ours = getattr(kvm.kvm_run, name.split(".")[1]).offset
        else:
            ours = getattr(kvm, name)
        if isinstance(ours, type):
            ours = ctypes.sizeof(ours)
        if ours != value:
            mismatches.append(f"{name}: ours {ours:#x}, header {value:#x}")
    assert not mismatches, mismatches
