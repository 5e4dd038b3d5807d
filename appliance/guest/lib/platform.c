/* platform.h on hypercalls (docs/guest-abi.md). */
#include "platform.h"
#include "abi.h"
#include "runtime.h"

uint64_t plat_now_ns(void)
{
    struct hc_time t;
    hypercall(HC_TIME, &t);
    return t.monotonic_ns;
}

uint64_t plat_wall_ns(void)
{
    struct hc_time t;
    hypercall(HC_TIME, &t);
    return t.wall_ns;
}

void plat_console_write(const char *s, size_t n)
{
    struct hc_console_write arg = { (uint64_t)(uintptr_t)s, n };
    hypercall(HC_CONSOLE_WRITE, &arg);
}

bool plat_poll(uint64_t deadline_ns)
{
    struct hc_poll arg = { deadline_ns, 0 };
    hypercall(HC_POLL, &arg);
    return arg.ready != 0;
}

size_t plat_net_read(void *frame, size_t cap)
{
    struct hc_net_read arg = { (uint64_t)(uintptr_t)frame, cap, 0 };
    hypercall(HC_NET_READ, &arg);
    return arg.len;
}

int plat_net_write(const void *frame, size_t len)
{
    struct hc_net_write arg = { (uint64_t)(uintptr_t)frame, len, -1 };
    hypercall(HC_NET_WRITE, &arg);
    return (int)arg.ret;
}

void plat_net_mac(uint8_t mac[6])
{
    memcpy(mac, boot_info->mac, 6);
}

uint64_t plat_block_sectors(void)
{
    return boot_info->disk_sectors;
}

int plat_block_read(uint64_t sector, void *buf, size_t count)
{
    struct hc_block arg = { sector, (uint64_t)(uintptr_t)buf, count, -1 };
    hypercall(HC_BLOCK_READ, &arg);
    return (int)arg.ret;
}

int plat_block_write(uint64_t sector, const void *buf, size_t count)
{
    struct hc_block arg = { sector, (uint64_t)(uintptr_t)buf, count, -1 };
    hypercall(HC_BLOCK_WRITE, &arg);
    return (int)arg.ret;
}

const char *plat_cmdline(void)
{
    return boot_info->cmdline;
}

void plat_halt(int status)
{
    struct hc_halt arg = { (uint64_t)(uint32_t)status };
    for (;;)
        hypercall(HC_HALT, &arg);
}
