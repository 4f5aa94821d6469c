/*
 * The QEMU peer guest of twinrun-bench's `peers` section: a bare 32-bit multiboot
 * kernel (protected mode, paging off) that QEMU boots with
 * `-kernel peer-guest.elf -append "..."` through SeaBIOS's multiboot option ROM.
 *
 * It does what twinrun's test guest does for the initial-sync figure, so that QEMU's
 * live migration and twinrun's sync move the same memory:
 *   1. fills a working set of `wset` pages (4 KiB each, from 8 MiB up) with non-zero
 *      words, a seeded value per page, once (zero pages would flatter both sides:
 *      QEMU and twinrun both send them without data);
 *   2. then writes one word per page, cycling through the working set, at `rate`
 *      pages/s (paced by the TSC, calibrated against the PIT); `rate=0` writes nothing
 *      more (twinrun's sync figure: its guest writes its pages once);
 *   3. prints progress on COM1 once a second, and on a `v` received on COM1 (polled
 *      every 100 ms) checks every page of the working set against what it wrote (a
 *      migrated guest proves its memory arrived intact).
 *
 * Why it sleeps between steps (`hlt`, woken by the PIT at 1 kHz) instead of spinning:
 * the development machines' software KVM emulates every instruction of a guest at
 * CPL0 or without paging (this guest is both; 32-bit paging triple-faults there), and
 * an emulated spin loop cut QEMU's migration throughput to a third of what it is with
 * the vCPU halted. An idle guest halts, like a real OS. (twinrun's test guest spins at
 * CPL3, natively, on one core: QEMU's side keeps that core for its migration.)
 * The interrupt handler does not return with `iret` (the same emulator cannot run a
 * protected-mode `iret`): it acknowledges the PIC, resets the stack and jumps back to
 * the top of the idle loop, whose state lives in globals.
 *
 * Parameters come from the multiboot command line (QEMU's `-append`, after the
 * kernel's file name): `wset=<pages> rate=<pages/s> seed=<n> [filled=1]` (filled: the
 * working set already holds its contents; see peer_init).
 *
 * Serial lines (the bench parses them; keep them stable):
 *   PEER boot mem_kib=<n> tsc_khz=<n> wset=<n> rate=<n> seed=<n>
 *   PEER filled pages=<n> ms=<n>
 *   PEER tick s=<seconds since filled> writes=<total word writes> last=<in the last s>
 *   PEER verify pages=<n> bad=<n>
 *   PEER error <text>
 *
 * Build (the bench does it): gcc -m32 -ffreestanding -nostdlib -fno-pic -no-pie -O2
 *   -static -Wl,-T,link.ld -Wl,--build-id=none guest.c -o peer-guest.elf
 * There is no 32-bit libgcc here: no 64-bit division in this file (div64 below).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define PAGE 4096u
#define WORDS (PAGE / 4u)
/* The working set starts here: above the kernel (loaded at 1 MiB), the multiboot
 * information and the command line QEMU puts after it. */
#define WSET_BASE (8u << 20)
#define COM1 0x3f8
#define PIT_HZ 1193182u
/* Timer interrupts per second (the pacing step). */
#define TIMER_HZ 1000u
#define STACK_SIZE 16384u

/* ---- multiboot header (first 8 KiB of the image, 4-byte aligned) ---- */
#define MB_MAGIC 0x1BADB002u
#define MB_FLAGS 0x00000003u /* modules page-aligned, memory information wanted */
__attribute__((section(".multiboot"), aligned(4), used)) static const u32 mb_header[3] = {
    MB_MAGIC, MB_FLAGS, (u32)(-(MB_MAGIC + MB_FLAGS))};

struct mb_info {
    u32 flags;
    u32 mem_lower; /* KiB below 1 MiB */
    u32 mem_upper; /* KiB above 1 MiB */
    u32 boot_device;
    u32 cmdline; /* physical address of a NUL-terminated string */
};

/* Referenced from the assembly below. */
u8 stack[STACK_SIZE] __attribute__((aligned(16), used));
void peer_init(u32 magic, const struct mb_info *mbi);
void peer_step(void);
void peer_fault(void);

/* Entry: the loader jumps to _start in 32-bit protected mode with flat segments,
 * eax = the bootloader magic, ebx = the multiboot information. peer_init returns
 * once the working set is filled and the timer runs (or never, on an error).
 * idle: one step of work, then sleep until the next interrupt. irq: a timer (or
 * spurious) interrupt: end of interrupt to both PICs, then the idle loop again on a
 * fresh stack (what the interrupt pushed is dropped; nothing returns to it). */
__asm__(".section .text\n"
        ".global _start\n"
        "_start:\n"
        "  cli\n"
        "  mov $stack + 16384, %esp\n"
        "  push %ebx\n"
        "  push %eax\n"
        "  call peer_init\n"
        "idle:\n"
        "  mov $stack + 16384, %esp\n"
        "  call peer_step\n"
        "  sti\n"
        "  hlt\n"
        "  cli\n"
        "  jmp idle\n"
        ".global peer_irq\n"
        "peer_irq:\n"
        "  mov $0x20, %al\n"
        "  out %al, $0xa0\n"
        "  out %al, $0x20\n"
        "  jmp idle\n"
        ".global peer_exception\n"
        "peer_exception:\n"
        "  mov $stack + 16384, %esp\n"
        "  call peer_fault\n"
        "1: cli\n"
        "  hlt\n"
        "  jmp 1b\n");
void peer_irq(void);
void peer_exception(void);

/* ---- port I/O, TSC ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* u64 / u32 with the CPU's 64-by-32 divide, in two steps so that neither overflows. */
static u64 div64(u64 n, u32 d) {
    u32 hi = (u32)(n >> 32), lo = (u32)n, qhi, qlo, r;
    qhi = hi / d;
    r = hi % d;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
    return ((u64)qhi << 32) | qlo;
}

/* ---- serial (COM1, polled) ---- */
static void serial_init(void) {
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xC7); /* FIFO on, cleared */
    outb(COM1 + 4, 0x03); /* DTR, RTS */
}
static void putc(char c) {
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (u8)c);
}
static void puts(const char *s) {
    while (*s)
        putc(*s++);
}
static void putu(u64 v) {
    char b[24];
    int i = 0;
    do {
        u64 q = div64(v, 10);
        b[i++] = (char)('0' + (u32)(v - q * 10));
        v = q;
    } while (v);
    while (i)
        putc(b[--i]);
}
static void kv(const char *key, u64 v) {
    putc(' ');
    puts(key);
    putc('=');
    putu(v);
}
/* A byte received on COM1, or -1. */
static int getc_nowait(void) { return (inb(COM1 + 5) & 0x01) ? inb(COM1) : -1; }

/* ---- command line ---- */
static int starts_with(const char *s, const char *p) {
    while (*p)
        if (*s++ != *p++)
            return 0;
    return 1;
}
/* The value of `key=` in `cmd` (a decimal number), or `dflt`. */
static u32 param(const char *cmd, const char *key, u32 dflt) {
    for (const char *s = cmd; s && *s; s++) {
        if ((s == cmd || s[-1] == ' ') && starts_with(s, key)) {
            const char *v = s;
            while (*key++)
                v++;
            if (*v++ != '=')
                continue;
            u32 n = 0;
            while (*v >= '0' && *v <= '9')
                n = n * 10 + (u32)(*v++ - '0');
            return n;
        }
    }
    return dflt;
}

/* ---- timing: TSC ticks per second from the PIT's channel 2 (50 ms one-shot) ---- */
static u64 tsc_hz(void) {
    const u32 count = PIT_HZ / 20;
    outb(0x61, (u8)((inb(0x61) & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xB0);                             /* channel 2, lo/hi byte, mode 0 */
    outb(0x42, (u8)count);
    outb(0x42, (u8)(count >> 8));
    u64 t0 = rdtsc();
    while (!(inb(0x61) & 0x20))
        ;
    return (rdtsc() - t0) * 20;
}

/* ---- interrupts: IDT (exceptions to peer_exception, IRQs 0-15 at vectors 32-47 to
 * peer_irq), both PICs remapped with only IRQ 0 unmasked, PIT channel 0 at TIMER_HZ */
struct gate {
    u16 off_lo, sel;
    u8 zero, type;
    u16 off_hi;
} __attribute__((packed));
static struct gate idt[48] __attribute__((aligned(8)));
static struct {
    u16 limit;
    u32 base;
} __attribute__((packed)) idtr;

static void set_gate(int v, void (*f)(void), u16 cs) {
    u32 a = (u32)f;
    idt[v] = (struct gate){(u16)a, cs, 0, 0x8E /* present, DPL 0, 32-bit interrupt gate */,
                           (u16)(a >> 16)};
}

static void interrupts_init(void) {
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (int v = 0; v < 48; v++)
        set_gate(v, v < 32 ? peer_exception : peer_irq, cs);
    idtr.limit = sizeof(idt) - 1;
    idtr.base = (u32)idt;
    __asm__ volatile("lidt %0" : : "m"(idtr));
    /* ICW1-4: edge triggered, cascade, vectors 32 and 40, 8086 mode. */
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 32);
    outb(0xA1, 40);
    outb(0x21, 0x04);
    outb(0xA1, 0x02);
    outb(0x21, 0x01);
    outb(0xA1, 0x01);
    outb(0x21, 0xFE); /* IRQ 0 only */
    outb(0xA1, 0xFF);
    const u32 count = PIT_HZ / TIMER_HZ;
    outb(0x43, 0x34); /* channel 0, lo/hi byte, mode 2 (rate generator) */
    outb(0x40, (u8)count);
    outb(0x40, (u8)(count >> 8));
}

/* ---- page contents: page p holds the non-zero word value(seed, p) in every 32-bit
 * word but word 0, which becomes the page's write counter once the paced writes
 * start. Filled and checked with string instructions: the emulator runs `rep stos`
 * and `repe scas` at ~16 MB/s, a word loop ~100x slower. ---- */
static inline u32 value(u32 seed, u32 p) {
    u32 x = seed * 0x9E3779B9u ^ (p * 0x85EBCA6Bu) ^ 0x5bd1e995u;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 12;
    return x | 1u; /* never zero */
}

static void fill(u32 *base, u32 pages, u32 seed) {
    for (u32 p = 0; p < pages; p++) {
        u32 *d = base + p * WORDS, n = WORDS;
        __asm__ volatile("cld; rep stosl" : "+D"(d), "+c"(n) : "a"(value(seed, p)) : "memory");
    }
}

/* Pages whose words 1..1023 do not all hold their value. */
static u32 verify(u32 *base, u32 pages, u32 seed) {
    u32 bad = 0;
    for (u32 p = 0; p < pages; p++) {
        u32 *d = base + p * WORDS + 1, n = WORDS - 1;
        __asm__ volatile("cld; repe scasl" : "+D"(d), "+c"(n) : "a"(value(seed, p)) : "memory", "cc");
        /* Stopped early, or stopped at the end on a mismatch of the last word. */
        if (n != 0 || d[-1] != value(seed, p))
            bad++;
    }
    return bad;
}

/* ---- the state of the idle loop (peer_step runs on a fresh stack every time) ---- */
static struct {
    u32 *base;
    u32 wset, rate, seed, next;
    u64 hz, per_page, due, tick, poll, writes, last, secs;
} st;

void peer_init(u32 magic, const struct mb_info *mbi) {
    serial_init();
    if (magic != 0x2BADB002u) {
        puts("PEER error not booted by a multiboot loader\n");
        for (;;)
            __asm__ volatile("hlt");
    }
    const char *cmd = (mbi->flags & 4) ? (const char *)mbi->cmdline : "";
    u32 mem_kib = (mbi->flags & 1) ? mbi->mem_upper + 1024 : 0;
    st.wset = param(cmd, "wset", 1024);
    st.rate = param(cmd, "rate", 0);
    st.seed = param(cmd, "seed", 1);
    st.hz = tsc_hz();
    puts("PEER boot");
    kv("mem_kib", mem_kib);
    kv("tsc_khz", div64(st.hz, 1000));
    kv("wset", st.wset);
    kv("rate", st.rate);
    kv("seed", st.seed);
    putc('\n');
    u32 room = mem_kib > (WSET_BASE >> 10) ? (mem_kib - (WSET_BASE >> 10)) / 4 : 0;
    if (st.wset == 0 || st.wset > room) {
        puts("PEER error wset out of range");
        kv("room", room);
        putc('\n');
        for (;;)
            __asm__ volatile("hlt");
    }
    st.base = (u32 *)WSET_BASE;
    u64 t0 = rdtsc();
    /* filled=1: the host put the working set's contents in guest memory before boot
     * (QEMU's memory backed by a file it wrote), as the fill would have: the fill runs
     * emulated here at 3-16 MB/s, minutes for 512 MiB. */
    if (!param(cmd, "filled", 0))
        fill(st.base, st.wset, st.seed);
    u64 t1 = rdtsc();
    puts("PEER filled");
    kv("pages", st.wset);
    kv("ms", div64(t1 - t0, (u32)div64(st.hz, 1000)));
    putc('\n');
    st.per_page = st.rate ? div64(st.hz, st.rate) : 0;
    st.due = st.poll = t1;
    st.tick = t1 + st.hz;
    interrupts_init();
}

void peer_step(void) {
    u64 now = rdtsc();
    /* Paced writes: every page whose time has come (a timer step's worth). */
    if (st.rate) {
        /* After a long stop (a migration's downtime) do not burst to catch up. */
        if (now > st.due + st.hz / 10)
            st.due = now;
        while (now >= st.due) {
            ((volatile u32 *)st.base)[st.next * WORDS] = (u32)st.writes;
            st.writes++;
            st.due += st.per_page;
            if (++st.next == st.wset)
                st.next = 0;
        }
    }
    if (now >= st.tick) {
        st.secs++;
        st.tick += st.hz;
        if (now > st.tick)
            st.tick = now + st.hz;
        puts("PEER tick");
        kv("s", st.secs);
        kv("writes", st.writes);
        kv("last", st.writes - st.last);
        putc('\n');
        st.last = st.writes;
    }
    /* COM1 is polled 10 times a second: every `inb` is an exit to QEMU. */
    if (now >= st.poll) {
        st.poll = now + st.hz / 10;
        if (getc_nowait() == 'v') {
            puts("PEER verify");
            kv("pages", st.wset);
            kv("bad", verify(st.base, st.wset, st.seed));
            putc('\n');
        }
    }
}

void peer_fault(void) { puts("PEER error CPU exception\n"); }
