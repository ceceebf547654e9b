/* PID 1 of a lab container: reaps orphans, exits on SIGTERM/SIGINT (which ends the pid
 * namespace). Static, so it runs in the container's busybox root and CRIU can dump it. */
#include <errno.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static volatile sig_atomic_t stop;

static void on_term(int sig) { (void)sig; stop = 1; }

int main(void)
{
    struct sigaction sa = { .sa_handler = on_term };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    while (!stop) {
        pid_t pid = wait(NULL);
        if (pid < 0 && errno == ECHILD)
            pause();
    }
    return 0;
}
