/* Swap-test victim: keeps using files on a mount while the test switches it to another.
 *
 * usage: victim A_DIR CTRL_DIR [threads N] [fork] [clonefiles] [quiet]
 * Works with cwd = A_DIR and these references, all opened on A at start:
 *   log.txt    O_APPEND               one line per iteration ("%ld\n")
 *   shared.txt O_RDWR|O_CLOEXEC + dup fixed 16-byte records, alternating the two fds
 *              (and a forked / CLONE_FILES child writes through the same description)
 *   nb.txt     O_WRONLY|O_NONBLOCK    one record per iteration
 *   ro.txt     O_RDONLY               reads 9-byte records "%08ld\n" and checks them
 *   fifo       O_RDWR, in epoll       writes a byte, epoll_wait must fire, reads it back
 *   fifo2      O_RDWR                 "PRELOAD" written at start, read back at the end
 *   lock.txt   POSIX write lock, flock.txt flock(LOCK_EX), ofd.txt OFD write lock
 *   c.N        created relative to cwd every 50 iterations
 * with "maps" (files prepared by the test, fds closed after mmap):
 *   shared.map  MAP_SHARED rw, page 0 gets the iteration number; mlock'ed
 *   private.map MAP_PRIVATE rw, pages 1 and 3 overwritten with 'P' (copy-on-write data),
 *               page 3 then made read-only (like RELRO); MADV_DONTDUMP; checked every
 *               iteration: pages 0 and 2 = the file pattern (i % 251), 1 and 3 = 'P' 
 * Runs until CTRL_DIR/stop exists, then writes CTRL_DIR/report.PID (key=value lines); its
 * loop count is in CTRL_DIR/progress.PID meanwhile (a shared mapping of one long).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/file.h>
#include <sys/inotify.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char ctrl[4096];
static int fd_log, fd_sh, fd_sh2, fd_nb, fd_ro, fd_fifo, fd_fifo2, fd_lock, fd_flock, fd_ofd, ep;
static long errors_read, errors_fifo, epoll_miss, epoll_eintr, thread_eintr, errors_map;
static long ro_base;   /* n at which ro.txt was last started over */
static off_t ro_size;  /* its size: the records are read in a loop */
static volatile sig_atomic_t usr1_count;
static volatile long rt_sum;
static void on_usr1(int sig) { (void)sig; usr1_count++; }
static void on_rt(int sig, siginfo_t *info, void *ctx) { (void)sig; (void)ctx; rt_sum += info->si_value.sival_int; }
static volatile long *shared_map;
static unsigned char *private_map;
#define PAGE 4096

static void setup_maps(void) {
    int fd = open("shared.map", O_RDWR);
    shared_map = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    fd = open("private.map", O_RDONLY);
    private_map = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    close(fd);
    if (shared_map == MAP_FAILED || private_map == MAP_FAILED) exit(10);
    memset(private_map + PAGE, 'P', PAGE);
    memset(private_map + 3 * PAGE, 'P', PAGE);
    mprotect(private_map + 3 * PAGE, PAGE, PROT_READ);
    madvise(private_map, 3 * PAGE, MADV_DONTDUMP);
    mlock((void *)shared_map, 4 * PAGE);
}

static void check_maps(long n) {
    shared_map[0] = n;
    for (int page = 0; page < 4; page++)
        for (int i = 0; i < PAGE; i += 512) {
            long at = page * PAGE + i;
            unsigned char want = (page == 1 || page == 3) ? 'P' : (unsigned char)(at % 251);
            if (private_map[at] != want) errors_map++;
        }
}

/* Its own view of the no-mix property: cwd and every file fd on the same filesystem,
 * checked each iteration (so a switch half done while this code runs is seen).  A switch
 * may land between two of these calls: then cwd differs before and after, and it checks again. */
static long mixed;
static void check_one_side(void) {
    int fds[] = {fd_log, fd_sh, fd_sh2, fd_nb, fd_ro, fd_fifo, fd_fifo2, fd_lock, fd_flock, fd_ofd};
    for (int attempt = 0; attempt < 3; attempt++) {
        struct stat st, after;
        int bad = stat(".", &st) != 0;
        dev_t dev = st.st_dev;
        for (unsigned i = 0; !bad && i < sizeof fds / sizeof fds[0]; i++)
            if (fstat(fds[i], &st) || st.st_dev != dev) bad = 1;
        if (stat(".", &after) == 0 && after.st_dev != dev) continue;
        if (bad) mixed++;
        return;
    }
    mixed++;
}

static int stop_requested(void) {
    char p[4200];
    snprintf(p, sizeof p, "%s/stop", ctrl);
    return access(p, F_OK) == 0;
}

static void record(int fd, char tag, long n) {
    char buf[17];
    snprintf(buf, sizeof buf, "%c%014ld\n", tag, n);
    if (write(fd, buf, 16) != 16) errors_fifo += 1000000;
}

static void *sleeper(void *arg) {
    long kind = (long)arg;
    while (!stop_requested()) {
        if (kind % 2 == 0) {
            struct timespec ts = {0, 3000000};
            nanosleep(&ts, NULL);
        } else {
            int e = epoll_create1(0);
            struct epoll_event ev;
            int r = epoll_wait(e, &ev, 1, 20);
            if (r < 0 && errno == EINTR) __atomic_add_fetch(&thread_eintr, 1, __ATOMIC_RELAXED);
            close(e);
        }
    }
    return NULL;
}

static int child_main(void *arg) {
    (void)arg;
    long n = 0;
    while (!stop_requested()) {
        record(fd_sh, 'C', n++);
        usleep(1000);
    }
    char p[4200];
    snprintf(p, sizeof p, "%s/child.%d", ctrl, getpid());
    FILE *f = fopen(p, "w");
    fprintf(f, "writes=%ld\n", n);
    fclose(f);
    return 0;
}

int main(int argc, char **argv) {
    int threads = 0, do_fork = 0, clonefiles = 0, maps = 0, watch = 0;
    long creates = 0, create_events = 0, ignored_events = 0;
    int ino_fd = -1;
    if (argc < 3) return 2;
    snprintf(ctrl, sizeof ctrl, "%s", argv[2]);
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "threads")) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "fork")) do_fork = 1;
        else if (!strcmp(argv[i], "clonefiles")) clonefiles = 1;
        else if (!strcmp(argv[i], "maps")) maps = 1;
        else if (!strcmp(argv[i], "inotify")) watch = 1;
    }
    if (chdir(argv[1])) return 3;
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    struct sigaction sr = {0};
    sr.sa_sigaction = on_rt;
    sr.sa_flags = SA_RESTART | SA_SIGINFO;
    sigaction(SIGRTMIN, &sr, NULL);
    fd_log = open("log.txt", O_WRONLY | O_APPEND | O_CREAT, 0644);
    fd_sh = open("shared.txt", O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    fd_sh2 = dup(fd_sh);
    fd_nb = open("nb.txt", O_WRONLY | O_NONBLOCK | O_CREAT | O_TRUNC, 0644);
    fd_ro = open("ro.txt", O_RDONLY);
    if (fd_ro >= 0) ro_size = lseek(fd_ro, 0, SEEK_END), lseek(fd_ro, 0, SEEK_SET);
    fd_fifo = open("fifo", O_RDWR);
    fd_fifo2 = open("fifo2", O_RDWR);
    fd_lock = open("lock.txt", O_RDWR | O_CREAT, 0644);
    fd_flock = open("flock.txt", O_RDWR | O_CREAT, 0644);
    fd_ofd = open("ofd.txt", O_RDWR | O_CREAT, 0644);
    if (fd_log < 0 || fd_sh < 0 || fd_nb < 0 || fd_ro < 0 || fd_fifo < 0 || fd_fifo2 < 0 || fd_lock < 0) return 4;
    struct flock fl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 0};
    if (fcntl(fd_lock, F_SETLK, &fl)) return 5;
    if (flock(fd_flock, LOCK_EX | LOCK_NB)) return 6;
    struct flock ofl = {.l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = 0, .l_len = 10};
    if (fcntl(fd_ofd, F_OFD_SETLK, &ofl)) return 7;
    if (write(fd_fifo2, "PRELOAD", 7) != 7) return 8;
    if (maps) setup_maps();
    if (watch) {
        ino_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (inotify_add_watch(ino_fd, ".", IN_CREATE) < 0) return 11;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0x1234567890abcdefULL};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd_fifo, &ev)) return 9;

    pthread_t tids[64];
    for (int i = 0; i < threads && i < 64; i++) pthread_create(&tids[i], NULL, sleeper, (void *)(long)i);
    pid_t child = -1;
    if (do_fork) {
        child = fork();
        if (child == 0) _exit(child_main(NULL));
    } else if (clonefiles) {
        static char stack[1 << 16];
        child = clone(child_main, stack + sizeof stack, CLONE_FILES | SIGCHLD, NULL);
    }
    /* the loop count, for tests to wait on instead of sleeping: CTRL_DIR/progress.PID,
       a shared mapping of one long (outside the mounts under test) */
    char prog[4200];
    snprintf(prog, sizeof prog, "%s/progress.%d", ctrl, getpid());
    int fd_prog = open(prog, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_prog < 0 || ftruncate(fd_prog, sizeof(long))) { perror(prog); return 1; }
    volatile long *progress = mmap(NULL, sizeof(long), PROT_READ | PROT_WRITE, MAP_SHARED, fd_prog, 0);
    if (progress == MAP_FAILED) { perror("mmap progress"); return 1; }
    close(fd_prog);
    char ready[4200];
    snprintf(ready, sizeof ready, "%s/ready.%d", ctrl, getpid());
    close(open(ready, O_WRONLY | O_CREAT, 0644));

    long n = 0;
    while (!stop_requested()) {
        check_one_side();
        char buf[32];
        int len = snprintf(buf, sizeof buf, "%ld\n", n);
        if (write(fd_log, buf, len) != len) errors_fifo += 1000;
        record(n % 2 ? fd_sh2 : fd_sh, 'P', n);
        record(fd_nb, 'N', n);
        char rec[10] = {0}, want[24];
        ssize_t got_ro = read(fd_ro, rec, 9);
        if (got_ro == 0 && n > ro_base && lseek(fd_ro, 0, SEEK_CUR) == ro_size) {
            /* a slow run outlived the records: start over (only from the very end of the
               file: an offset the switch lost would not land exactly there) */
            ro_base = n;
            lseek(fd_ro, 0, SEEK_SET);
            got_ro = read(fd_ro, rec, 9);
        }
        snprintf(want, sizeof want, "%08ld\n", n - ro_base);
        if (got_ro != 9 || memcmp(rec, want, 9)) errors_read++;
        if (write(fd_fifo, "x", 1) != 1) errors_fifo++;
        struct epoll_event got;
        int r;
        do {
            r = epoll_wait(ep, &got, 1, 1000);
            if (r < 0 && errno == EINTR) epoll_eintr++;
        } while (r < 0 && errno == EINTR);
        if (r != 1 || got.data.u64 != 0x1234567890abcdefULL) epoll_miss++;
        char c;
        if (read(fd_fifo, &c, 1) != 1 || c != 'x') errors_fifo++;
        if (maps) check_maps(n);
        if (n % 50 == 0) {
            char name[64];
            snprintf(name, sizeof name, "c.%ld", n);
            close(open(name, O_WRONLY | O_CREAT, 0644));
            creates++;
        }
        if (watch) {
            char evbuf[4096];
            ssize_t len;
            while ((len = read(ino_fd, evbuf, sizeof evbuf)) > 0)
                for (char *e = evbuf; e < evbuf + len; e += sizeof(struct inotify_event) + ((struct inotify_event *)e)->len) {
                    uint32_t mask = ((struct inotify_event *)e)->mask;
                    if (mask & IN_CREATE) create_events++;
                    if (mask & IN_IGNORED) ignored_events++;
                }
        }
        n++;
        *progress = n;
        usleep(1000);
    }
    for (int i = 0; i < threads && i < 64; i++) pthread_join(tids[i], NULL);
    if (child > 0) waitpid(child, NULL, 0);
    char pre[8] = {0};
    int flags = fcntl(fd_fifo2, F_GETFL);
    fcntl(fd_fifo2, F_SETFL, flags | O_NONBLOCK);
    ssize_t got_pre = read(fd_fifo2, pre, 7);
    char cwd[4096] = {0};
    if (readlink("/proc/self/cwd", cwd, sizeof cwd - 1) < 0) strcpy(cwd, "?");
    struct stat st_cwd, st_log;
    stat(".", &st_cwd);
    fstat(fd_log, &st_log);
    char p[4200];
    snprintf(p, sizeof p, "%s/report.%d", ctrl, getpid());
    FILE *f = fopen(p, "w");
    fprintf(f, "iterations=%ld\n", n);
    fprintf(f, "usr1=%d\nrt_sum=%ld\n", (int)usr1_count, rt_sum);
    fprintf(f, "append=%d\n", !!(fcntl(fd_log, F_GETFL) & O_APPEND));
    fprintf(f, "nonblock=%d\n", !!(fcntl(fd_nb, F_GETFL) & O_NONBLOCK));
    fprintf(f, "cloexec_sh=%d\n", !!(fcntl(fd_sh, F_GETFD) & FD_CLOEXEC));
    fprintf(f, "cloexec_dup=%d\n", !!(fcntl(fd_sh2, F_GETFD) & FD_CLOEXEC));
    fprintf(f, "pos_equal=%d\n", lseek(fd_sh, 0, SEEK_CUR) == lseek(fd_sh2, 0, SEEK_CUR));
    fprintf(f, "errors_map=%ld\nmaps=%d\n", errors_map, maps);
    fprintf(f, "creates=%ld\ncreate_events=%ld\nignored_events=%ld\n", creates, create_events, ignored_events);
    fprintf(f, "errors_read=%ld\nerrors_fifo=%ld\nepoll_miss=%ld\nepoll_eintr=%ld\nthread_eintr=%ld\n",
            errors_read, errors_fifo, epoll_miss, epoll_eintr, thread_eintr);
    fprintf(f, "preload=%s\n", got_pre == 7 ? pre : "MISSING");
    fprintf(f, "mixed=%ld\n", mixed);
    fprintf(f, "cwd=%s\ncwd_dev=%lu\nlog_dev=%lu\n", cwd, (unsigned long)st_cwd.st_dev, (unsigned long)st_log.st_dev);
    fclose(f);
    return 0;
}
