/* PID 1 of a lab container: reaps orphans, exits on SIGTERM/SIGINT (which ends the pid
 * namespace). Static, so it runs in the container's busybox root and CRIU can dump it. */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

/* Only there so that SIGCHLD ends the sleep below: its default action is to ignore it. */
static void on_child(int sig) { (void)sig; }

int main(void)
{
    struct sigaction sa = { .sa_handler = on_term };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    struct sigaction child = { .sa_handler = on_child };
    sigaction(SIGCHLD, &child, NULL);
    /* SIGCHLD stays blocked except inside sigsuspend: an orphan that arrives and exits
     * between wait()'s ECHILD and the sleep still wakes us. Orphans reparented to us are
     * reaped as they exit, so a dead workload does not linger as a zombie that looks alive. */
    sigset_t blocked, during_sleep;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGCHLD);
    sigprocmask(SIG_BLOCK, &blocked, &during_sleep);
    sigdelset(&during_sleep, SIGCHLD);
    while (!stop) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid > 0)
            continue;
        sigsuspend(&during_sleep);
    }
    return 0;
}
