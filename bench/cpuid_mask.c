/*
 * Run a process as if its CPU lacked VNNI (and, for "avx2", AVX-512): real instructions at
 * native speed, only the CPUID answers change.
 *
 *   make bench/cpuid_mask.so
 *   CPUID_MASK=avx2 LD_PRELOAD=bench/cpuid_mask.so python -m bench.isa_bench --from DIR
 *
 * Profiles (CPUID_MASK):
 *   avx2    no AVX-512, no VNNI of any kind, no AMX (an AVX2-only CPU such as AMD Zen 2/3)
 *   avx512  AVX-512 (F, BW, ...) without VNNI or AMX (such as Intel Skylake-SP)
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, Intel CPUs with the cpuid_fault
 * flag) makes every CPUID instruction of the process trap; the SIGSEGV handler executes the
 * real CPUID with faulting briefly off, clears the masked feature bits and resumes after the
 * instruction. Libraries that pick their kernels from CPUID (ONNX Runtime's MLAS, numpy) then
 * run their AVX2 (or AVX-512 without VNNI) code. glibc's own choices, made before this library
 * loads, are unaffected and harmless: the hardware has those instructions.
 *
 * Nothing silently wrong: where CPUID faulting is unavailable (AMD hosts, most VMs) or the
 * profile is unknown, the process exits with status 3 and says why before running anything.
 * A SIGSEGV that is not a CPUID goes to the handler the process installed (Python's
 * faulthandler, which pytest enables; gcc's crash handler): this library's sigaction() and
 * signal() keep its own handler in place and record the process's one as the next in line.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

/* Leaf 7 sub-leaf 0 (EBX, ECX, EDX) and sub-leaf 1 (EAX, EDX) bits cleared per profile. */
struct mask {
    const char *name;
    uint32_t l7_ebx, l7_ecx, l7_edx, l71_eax, l71_edx;
};

/* VNNI in every form and AMX: AVX512_VNNI (7.ECX 11), AVX512_4VNNIW (7.EDX 2), AMX-BF16/
 * INT8/TILE/FP16 (7.EDX 22, 25, 24; 7.1.EAX 21), AVX-VNNI (7.1.EAX 4), AVX-VNNI-INT8 and
 * AVX-VNNI-INT16 (7.1.EDX 4, 10). */
#define VNNI_ECX BIT(11)
#define VNNI_EDX (BIT(2) | BIT(22) | BIT(24) | BIT(25))
#define VNNI_71_EAX (BIT(4) | BIT(21))
#define VNNI_71_EDX (BIT(4) | BIT(10))
/* The AVX-512 family: F DQ IFMA PF ER CD BW VL (7.EBX), VBMI VBMI2 BITALG VPOPCNTDQ (7.ECX),
 * 4FMAPS VP2INTERSECT FP16 (7.EDX), BF16 and AVX10 (7.1.EAX 5, 7.1.EDX 19). */
#define AVX512_EBX (BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31))
#define AVX512_ECX (BIT(1) | BIT(6) | BIT(12) | BIT(14))
#define AVX512_EDX (BIT(3) | BIT(8) | BIT(23))

static const struct mask MASKS[] = {
    {"avx2", AVX512_EBX, AVX512_ECX | VNNI_ECX, AVX512_EDX | VNNI_EDX, VNNI_71_EAX | BIT(5),
     VNNI_71_EDX | BIT(19)},
    {"avx512", 0, VNNI_ECX, VNNI_EDX, VNNI_71_EAX, VNNI_71_EDX},
};

static const struct mask *active;
static struct sigaction previous;
typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);
static sigaction_fn real_sigaction;

typedef void (*handler_fn)(int);
static handler_fn (*real_signal)(int, handler_fn);

/* SIGSEGV handlers installed after this library become the ones it hands other faults to. */
int sigaction(int sig, const struct sigaction *action, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !active) return real_sigaction(sig, action, old);
    if (old) *old = previous;
    if (action) previous = *action;
    return 0;
}

handler_fn signal(int sig, handler_fn handler) {
    if (!real_signal) real_signal = (handler_fn(*)(int, handler_fn))dlsym(RTLD_NEXT, "signal");
    if (sig != SIGSEGV || !active) return real_signal(sig, handler);
    handler_fn old = previous.sa_handler;
    if (previous.sa_flags & SA_SIGINFO) old = (handler_fn)(void (*)(void))previous.sa_sigaction;
    memset(&previous, 0, sizeof previous);
    previous.sa_handler = handler;
    return old;
}

static long set_cpuid_faulting(int on) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, on ? 0 : 1); }

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) {
        uint32_t leaf = (uint32_t)regs[REG_RAX], sub = (uint32_t)regs[REG_RCX];
        uint32_t a, b, c, d;
        set_cpuid_faulting(0);
        __cpuid_count(leaf, sub, a, b, c, d);
        set_cpuid_faulting(1);
        if (leaf == 7 && sub == 0) {
            b &= ~active->l7_ebx;
            c &= ~active->l7_ecx;
            d &= ~active->l7_edx;
        } else if (leaf == 7 && sub == 1) {
            a &= ~active->l71_eax;
            d &= ~active->l71_edx;
        }
        regs[REG_RAX] = a;
        regs[REG_RBX] = b;
        regs[REG_RCX] = c;
        regs[REG_RDX] = d;
        regs[REG_RIP] += 2;
        return;
    }
    if (previous.sa_flags & SA_SIGINFO && previous.sa_sigaction) {
        previous.sa_sigaction(sig, info, context);
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
    } else {
        signal(SIGSEGV, SIG_DFL); /* the faulting instruction re-runs and takes the default */
    }
}

static void refuse(const char *why) {
    fprintf(stderr, "cpuid_mask: %s; nothing was run\n", why);
    _exit(3);
}

__attribute__((constructor)) static void install(void) {
    const char *profile = getenv("CPUID_MASK");
    if (!profile) refuse("set CPUID_MASK to avx2 or avx512");
    const struct mask *chosen = NULL;
    for (size_t i = 0; i < sizeof MASKS / sizeof *MASKS; i++)
        if (strcmp(profile, MASKS[i].name) == 0) chosen = &MASKS[i];
    if (!chosen) refuse("CPUID_MASK must be avx2 or avx512");
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (!real_sigaction || real_sigaction(SIGSEGV, &action, &previous) != 0)
        refuse("cannot install the SIGSEGV handler");
    active = chosen; /* from here on, sigaction(SIGSEGV) records instead of replacing */
    if (set_cpuid_faulting(1) != 0)
        refuse("this CPU or kernel has no CPUID faulting (the cpuid_fault flag), so CPUID "
               "cannot be masked here");
}
