/*
 * spfs swap engine: the code injected into a stopped task (x86-64, AT&T syntax).
 *
 * It is written into the zero tail of the task's [vdso] mapping through
 * /proc/PID/mem and entered by setting rip with PTRACE_SETREGS.  Every entry
 * ends in `marker`, which sends the task a signal it ignores (chosen by the
 * tracer), then falls through into `epilogue`, which reloads the task's
 * original registers and jumps back to where it was interrupted.
 *
 * Why: a traced task always stops on signal delivery, even for an ignored
 * signal, so the live tracer regains control at the marker.  If the tracer
 * was killed, the signal is discarded and the task restores itself: no
 * instant exists at which a dead tracer leaves altered registers behind.
 *
 * Entry `run`  (r12 = first table entry, r13 = entry count,
 *               r14/r15 = base/length of a mapping to munmap after the
 *               table, r15 = 0 for none)
 *     executes table entries until one fails (unless it is marked
 *     allow-fail).  On return r12 points at the failing entry, r13 counts
 *     the entries not completed, rbx holds the last result.
 * Entry `single` (rax, rdi, rsi, rdx, r10, r8, r9 = one syscall)
 *     executes one syscall; rbx holds its result.
 *
 * Table entry (80 bytes): nr, a0..a5, flags, store, result.
 *     flags bit 0: failure allowed; bit 1+i: argument i is an address,
 *     load the argument from it; bit 7: a result of 0 counts as a failure
 *     (a read that hits end of file); bits 32-63: on failure, skip that many
 *     entries forward instead of ending the table (0: end it).  store: if
 *     non-zero, the result is also written there (how later entries use an
 *     fd created by an earlier one).
 *
 * The skips make a table a small program with branches: the commit tables
 * (tables.py) park at a signal the live tracer sees, then read the decision
 * byte and either finish the commit or undo it (end of file: the tracer is
 * gone), so a killed tracer never leaves a task half switched.
 */
        .text
        .globl blob_start
blob_start:
run:
        test    %r13, %r13
        jz      finish
        mov     56(%r12), %rbx
        mov     8(%r12), %rdi
        bt      $1, %rbx
        jnc     1f
        mov     (%rdi), %rdi
1:      mov     16(%r12), %rsi
        bt      $2, %rbx
        jnc     2f
        mov     (%rsi), %rsi
2:      mov     24(%r12), %rdx
        bt      $3, %rbx
        jnc     3f
        mov     (%rdx), %rdx
3:      mov     32(%r12), %r10
        bt      $4, %rbx
        jnc     4f
        mov     (%r10), %r10
4:      mov     40(%r12), %r8
        bt      $5, %rbx
        jnc     5f
        mov     (%r8), %r8
5:      mov     48(%r12), %r9
        bt      $6, %rbx
        jnc     6f
        mov     (%r9), %r9
6:      mov     (%r12), %rax
        syscall
loop_syscall_end:
        mov     %rax, 72(%r12)
        mov     64(%r12), %rcx
        test    %rcx, %rcx
        jz      7f
        mov     %rax, (%rcx)
7:      cmp     $-4095, %rax
        jae     9f
        test    %rax, %rax
        jnz     8f
        bt      $7, %rbx
        jnc     8f
9:      test    $1, %bl
        jnz     8f
        mov     %rbx, %rcx
        shr     $32, %rcx
        jz      failed
        imul    $80, %rcx, %rdx
        add     %rdx, %r12
        sub     %rcx, %r13
        jmp     run
8:      add     $80, %r12
        dec     %r13
        jmp     run
finish:
        xor     %eax, %eax
failed:
        mov     %rax, %rbx
        test    %r15, %r15
        jz      marker
        mov     %r14, %rdi
        mov     %r15, %rsi
        mov     $11, %eax
        syscall
        jmp     marker
single:
        syscall
        mov     %rax, %rbx
marker:
        mov     $234, %eax
        mov     tgid(%rip), %rdi
        mov     tid(%rip), %rsi
        mov     sig(%rip), %rdx
        syscall
marker_end:
epilogue:
        lea     saved(%rip), %rsp
        pop     %r15
        pop     %r14
        pop     %r13
        pop     %r12
        pop     %rbp
        pop     %rbx
        pop     %r11
        pop     %r10
        pop     %r9
        pop     %r8
        pop     %rax
        pop     %rcx
        pop     %rdx
        pop     %rsi
        pop     %rdi
        popfq
        mov     saved_rsp(%rip), %rsp
        jmp     *saved_rip(%rip)
        .balign 8
data:
tgid:   .quad 0
tid:    .quad 0
sig:    .quad 0
saved_rsp: .quad 0
saved_rip: .quad 0
saved:  .fill 16, 8, 0
blob_end:
