/* LD_PRELOAD for the llama-server baseline on a CPU with AMX: ggml asks the kernel for the AMX
 * tile state (arch_prctl ARCH_REQ_XCOMP_PERM) before it offers its AMX weight buffers; refused,
 * it leaves them out ("AMX is not ready to be used!") and keeps its other repacked layouts
 * (CPU_REPACK), as edge-llm's llama_runtime.leave_out_amx does. Without it such a llama-server
 * dies at its first decode (llama.cpp issue #20824) unless it runs with --no-repack, which also
 * drops CPU_REPACK and would make it a weaker baseline than it is. Built by bench_servers.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <sys/syscall.h>

long syscall(long number, ...) {
    va_list ap;
    long a[6];
    va_start(ap, number);
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (number == SYS_arch_prctl && a[0] == 0x1023) { errno = EPERM; return -1; }
    static long (*real)(long, ...);
    if (!real) real = (long (*)(long, ...))dlsym(RTLD_NEXT, "syscall");
    return real(number, a[0], a[1], a[2], a[3], a[4], a[5]);
}
