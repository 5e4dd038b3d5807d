/* Entry point: the VMM starts us at CPL3 in long mode with RSP at the stack
 * top and RDI pointing at the boot info (docs/guest-abi.md). */
#include "platform.h"
#include "abi.h"
#include "runtime.h"

__asm__(
    ".text\n"
    ".globl _start\n"
    "_start:\n"
    "    andq $-16, %rsp\n"
    "    xorl %ebp, %ebp\n"
    "    call runtime_start\n"
    "    ud2\n");

const struct abi_boot_info *boot_info;

void runtime_start(const struct abi_boot_info *info) __attribute__((noreturn, used));

void runtime_start(const struct abi_boot_info *info)
{
    boot_info = info;
    if (info->magic != ABI_BOOT_MAGIC || info->abi_version != ABI_VERSION) {
        static const char msg[] = "runtime: bad boot info\n";
        plat_console_write(msg, sizeof msg - 1);
        plat_halt(255);
    }
    console_ring_init();
    heap_init(info->heap_start, info->heap_end);
    net_rings_init();
    plat_halt(guest_main());
}
