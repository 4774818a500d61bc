/*
 * jax_ll_ep: the synchronization protocol of the cpu backend, as a Promela model for spin.
 *
 * What it stands for: xla_ffi/cpu/protocol.cc (the send and receive halves, wait_for_signals, the call lifecycle on
 * RankState), xla_ffi/include/jax_ll_ep/layout.h (encode_signal, classify_signal, parity_of, the region layout) and
 * xla_ffi/ffi/cpu_handlers.cc (every non-OK Status becomes an ffi::Error, which fails the XLA execution; JAX then
 * refuses further calls on the buffer until buf.check()). Every step below names the function and line it models
 * (lines as of this writing; `scripts/model_check.sh --map` prints the current ones from verification/code_map.tsv).
 * verification/README.md explains the abstractions and the properties; scripts/model_check.sh runs every check.
 *
 * Configuration (spin -DNAME=value):
 *   R            ranks in the group (2 or 3); every rank owns EL = 2 local experts.
 *   NCALLS       calls per rank (4).
 *   SAME_PROGRAM 1: all ranks issue one program, chosen call by call among dispatch, combine, dispatch_send +
 *                dispatch_recv, combine_send + combine_recv (properties 1-4; no timeouts: a stuck wait is a hang).
 *                0: every rank chooses its own program among END/dispatch/combine (and, with HALVES, the separate
 *                halves in any order); waits may time out at any moment (property 5, and 1-3 for successful calls).
 *   SPLIT_OPS    SAME_PROGRAM only: 1 offers the split forms as separate choices (they run the same steps, see
 *                README), 0 only the fused ones.
 *   HALVES       SAME_PROGRAM 0 only: the program may also use dispatch_send/_recv, combine_send/_recv one by one,
 *                in any order (misuse included).
 *   CONTINUE_AFTER_ERROR  a rank keeps calling after an error (buf.check(), then calls on the same buffer).
 *   STICKY_ERRORS  proposed fix: after a timeout or mismatch, the send half refuses to write anything.
 *   ROUTING      0: counts alternate 0/1 over pairs and calls; 1: one token on every pair; 2: chosen per call.
 *   MASKING      SAME_PROGRAM only: Buffer(on_timeout="mask"). Every wait may time out at any moment while a signal of
 *                a rank it does not mask is missing; it then masks those ranks and completes without them
 *                (Call::mask_silent). Masked ranks are sent nothing and never waited on or read (their slots are
 *                ignored), and whoever is slow goes on writing late. P1-P4 hold for what every rank reads.
 *   DEATH        with MASKING: the last rank may stop for good at any step (a killed process), mid-send included.
 *   ONE_SLOW     with MASKING: only the last rank is ever later than timeout_s: another rank's wait times out only
 *                once every other signal is in and one of the late rank's is missing (the late rank itself may time
 *                out on anyone). A smaller state space, for R = 3.
 * Diagnostics: IGNORE_P3 (do not stop at property 3), SILENT_ONLY (property 1 only for ranks without an error).
 * Mutations (each must be caught; scripts/model_check.sh expects a violation):
 *   MUT_NO_ZERO_SIGNAL  the send half skips the signal of a zero-token pair.
 *   MUT_NO_PARITY       parity_of() is always 0: signals and receive regions are single-buffered.
 *   MUT_NO_EPOCH        classify_signal() ignores the sequence number (any signal of the right kind "arrived").
 *   MUT_SIGNAL_FIRST    the signals may become visible before the data they announce (no release/acquire order).
 *   MUT_NO_TIMEOUT      the wait has no deadline (SAME_PROGRAM 0 only).
 *   MUT_MASK_STILL_SENDS  (MASKING) a rank goes on sending to the ranks it masked: it no longer waits for them, so it
 *                       runs ahead of a slow one and overwrites what that one still reads (P3).
 *   MUT_ROWS_BY_TOKEN   (MASKING) the combine slots are not indexed by their writer: which rank writes a slot changes
 *                       from call to call (the earlier [token][k] row layout), so a masked rank's late write lands in
 *                       a slot a live rank filled for a later call (P1).
 */

#ifndef R
#define R 2
#endif
#define EL 2                 /* local experts per rank (Layout::num_local_experts) */
#ifndef NCALLS
#define NCALLS 4
#endif
#ifndef SAME_PROGRAM
#define SAME_PROGRAM 1
#endif
#ifndef SPLIT_OPS
#define SPLIT_OPS 1
#endif
#define NP (EL * R)          /* (local expert, rank) pairs of one region: Layout::num_pairs() */

#if SAME_PROGRAM
#define TIMEOUTS 0
#else
#ifdef MUT_NO_TIMEOUT
#define TIMEOUTS 0
#else
#define TIMEOUTS 1
#endif
#endif

/* OpKind (layout.h) */
#define KNONE 0
#define KD 1                 /* OpKind::kDispatch */
#define KC 2                 /* OpKind::kCombine */
#define ARR(k) ((k) - 1)     /* 0: the dispatch's signal array (dispatch_signal), 1: the combine's (combine_signal) */

/* A program step. OP_D / OP_C: the fused targets (jax_ll_ep_dispatch / _combine, phases kBothPhases). OP_DS / OP_CS
 * in SAME_PROGRAM: jax_ll_ep_dispatch_send then jax_ll_ep_dispatch_recv (two handler calls). With HALVES: one half. */
#define OP_END 0
#define OP_D 1
#define OP_C 2
#define OP_DS 3
#define OP_CS 4
#define OP_DR 5
#define OP_CR 6

/* SignalState (layout.h) */
#define PENDING 0
#define ARRIVED 1
#define MISMATCH 2

/* ErrorCode (layout.h) */
#define E_OK 0
#define E_TIMEOUT 1
#define E_MISMATCH 2
#define E_MISUSE 5

/* Phase (layout.h) */
#define SEND_PHASE 1
#define RECV_PHASE 2

/* encode_signal(seq, kind, count) (layout.h): seq in the high bits, then the kind, then the count. One token slot per
 * pair (count 0 or 1) is enough: see README, "Data". Sequence numbers stay below NCALLS + 1 here, so no wrap. */
#define SIG(s, k, c) ((s) * 8 + (k) * 2 + (c))
#define SSEQ(v) ((v) / 8)            /* signal_seq */
#define SKIND(v) (((v) / 2) % 4)     /* signal_kind */
#define SCNT(v) ((v) % 2)            /* signal_count */

/* classify_signal(signal, seq, kind) (layout.h): older -> pending; this call and kind -> arrived; this call with
 * kind none -> pending; anything else (another kind, or a newer call) -> mismatch. */
#ifdef MUT_NO_EPOCH
#define ST(v, cs, k) (SKIND(v) == (k) -> ARRIVED : (SKIND(v) == KNONE -> PENDING : MISMATCH))
#else
#define ST(v, cs, k) (SSEQ(v) < (cs) -> PENDING : \
                      (SSEQ(v) == (cs) && SKIND(v) == (k) -> ARRIVED : \
                       (SSEQ(v) == (cs) && SKIND(v) == KNONE -> PENDING : MISMATCH)))
#endif

/* parity_of(seq) (layout.h) */
#ifdef MUT_NO_PARITY
#define PARITY(s) 0
#else
#define PARITY(s) ((s) % 2)
#endif

/* Shared memory: for every rank r (its region), array a (dispatch / combine), parity p and pair (e, s) with
 * s = the peer rank: the signal of Layout::dispatch_signal / combine_signal that peer s writes for local expert
 * e (the receive slots, shared by both kinds, are DREG below). pair_index(e, s) = e * R + s (layout.h). */
#define REG(r, a, p) ((((r) * 2) + (a)) * 2 + (p))
#define IDX(r, a, p, e, s) (REG(r, a, p) * NP + (e) * R + (s))
byte sig[R * 4 * NP];        /* the signal words (zeroed memory at start: Registry::create, registry.cc) */
/* The receive slots are one area per (rank, parity) for both op kinds (Layout::message): pair (e, s) is written by s
 * only, a dispatch's tokens or a combine's rows. DREG(r, p) is that area, DIDX a slot of it. */
#define DREG(r, p) ((r) * 2 + (p))
#define DIDX(r, p, e, s) (DREG(r, p) * NP + (e) * R + (s))

/* Masking: mk[r] bit s set = rank r treats rank s as masked (rank_mask[0] in r's region, read and written only by r's
 * calls; global here only so that the ghost checks of property 3 can read it). */
#ifdef MASKING
byte mk[R];
#define MASKED_BY(r, s) ((mk[r] >> (s)) & 1)
#else
#define MASKED_BY(r, s) 0
#endif
#define MASKED(s) MASKED_BY(me, s)
#ifdef MUT_MASK_STILL_SENDS
#define SENDS_TO(d) 1
#else
#define SENDS_TO(d) (!MASKED(d))
#endif
/* The data slot writer s uses for pair (e, s) of rank r in its call n (the real layout: indexed by the writer). */
#if defined(MUT_ROWS_BY_TOKEN)
#define DSLOT(r, p, e, s, k, n) (DREG(r, p) * NP + (e) * R + ((k) == KC -> ((s) + (n) / 2) % R : (s)))
#else
#define DSLOT(r, p, e, s, k, n) DIDX(r, p, e, s)
#endif

/* Ghost state (not in the code; only read by assertions). A "call ordinal" is a rank's count of send halves it
 * started: its own numbering of the calls, kept apart from RankState.seq so that the checks do not trust seq. */
byte sorig[R * 4 * NP];      /* ordinal of the call whose send half stored sig[i] */
byte tag[R * 2 * NP];        /* ordinal of the call that last wrote the data slot i (0: never) */
byte rd[R * 4];              /* per signal region (r, a, p): ordinal of the call whose receive half uses it (0: none) */
byte cons[R * 4];            /* per signal region (r, a, p): ordinal of the last call its owner closed on it */
byte rdd[R * 2];             /* the same for the data area (r, p) of both kinds */
byte consd[R * 2];
#if !SAME_PROGRAM
byte kinds[R * (NCALLS + 1)];/* kinds[r * (NCALLS+1) + n]: OpKind of rank r's call ordinal n */
byte ncalls[R];              /* at the end: calls whose send half rank r ran */
byte errs[R];                /* at the end: the error rank r recorded (RankState.error_code) */
bit dangling[R];             /* at the end: rank r's last send half had no receive half */
#endif
byte finished;

#ifdef SILENT_ONLY
#define ASSERT_P1 assert(p1_completeness || err != E_OK)  /* only ranks that never saw an error */
#else
#define ASSERT_P1 assert(p1_completeness)
#endif
#ifdef IGNORE_P3
#define ASSERT_P3 skip          /* only to show what a reuse violation leads to (CONTINUE_AFTER_ERROR) */
#else
#define ASSERT_P3 assert(p3_reuse_safety)
#endif

/* Named results of the checks (an assertion on a named bit makes spin's report name the property). */
bit p1_completeness = 1;
bit p2_no_stale_signal = 1;
bit p3_reuse_safety = 1;
bit p4_no_false_error = 1;
bit p5_mismatch_detected = 1;

#if SAME_PROGRAM
/* The shared program, chosen lazily: the first rank to reach call n picks it, the last one to read it forgets it (so
 * states that differ only in already-finished calls merge). */
byte prog[NCALLS];
byte nread[NCALLS];
#endif

/* COUNT(s, d, e, n): the number of tokens sender s sends to (rank d, local expert e) in its call ordinal n (README,
 * "Data"). ROUTING 0: 0 or 1 alternating over pairs and calls, so every call has zero-token and one-token pairs for
 * every sender and receiver; 1: one token on every pair; 2 (COUNTS_NONDET): each send half picks its routing. */
#ifndef ROUTING
#define ROUTING 0
#endif
#if ROUTING == 1
#define COUNT(s, d, e, n) 1
#else
#define COUNT(s, d, e, n) (((s) + (d) + (e) + (n)) % 2)
#endif
#if ROUTING == 2
#define COUNTS_NONDET
#endif
#ifdef COUNTS_NONDET
/* Any routing: every send half picks the count of each of its NP pairs. The receiver's check takes the truth from
 * the signal: the same check asserts that the signal is this call's (property 2), whose count is the sender's. */
#define SENDCNT(q) ((route >> (q)) & 1)
/* the mask of COUNT(s, q / EL, q % EL, n) over q = d * EL + e */
#if EL == 2 && R == 2
#define PATTERN(s, n) (((s) + (n)) % 2 == 0 -> 6 : 9)
#endif
#if EL == 2 && R == 3
#define PATTERN(s, n) (((s) + (n)) % 2 == 0 -> 38 : 25)
#endif
#define TRUECNT(j) SCNT(OWN(j))
#else
#define SENDCNT(q) COUNT(me, (q) / EL, (q) % EL, gcall)
#define TRUECNT(j) COUNT((j) % R, me, (j) / R, gcall)
#endif

/* DEATH: the last rank may stop for good here (SIGKILL), whatever it was doing. */
#if defined(DEATH)
#define MAYBE_DIE if :: me == R - 1 -> goto dead :: true -> skip fi
#else
#define MAYBE_DIE skip
#endif

/* Call::fail (protocol.cc): the first error since the last check is kept. */
inline record(code) {
  if
  :: err == E_OK -> err = code
  :: else -> skip
  fi
}

/* ---- send half: dispatch_send (protocol.cc) / combine_send (protocol.cc) ---- */
inline data_phase() {
  /* dispatch_send writes every message of every token into the owner's receive slot [parity][e][me][slot] (memcpy);
   * combine_send every row into the source rank's receive slot [parity][e][me][slot] (memcpy). The code's
   * order of pairs follows the routing; the model writes pair by pair, one step each (README, "Order of the
   * writes"). A zero-token pair gets no data. */
  q = 0;
  do
  :: q < NP ->
     d = q / EL; e = q % EL;
     i = DSLOT(d, p, e, me, kind, gcall);
     if
     :: SENDCNT(q) == 1 && SENDS_TO(d) ->           /* (nothing is written to a masked rank) */
        atomic {
          printf("rank %d call %d: data -> rank %d expert %d\n", me, gcall, d, e);
          /* (3) reuse safety: the message neither overwrites one its owner has not consumed yet, nor lands in a
           * region its owner is reading for another call (unless its owner ignores this writer: masked) */
          p3_reuse_safety = (MASKED_BY(d, me) || (tag[i] <= consd[DREG(d, p)] &&
                             (rdd[DREG(d, p)] == 0 || rdd[DREG(d, p)] == gcall)));
          ASSERT_P3;
          tag[i] = gcall
        }
     :: else -> skip
     fi;
     MAYBE_DIE;
     q++
  :: else -> break
  od
}

inline signal_phase() {
  /* dispatch_send / combine_send: one store_release(encode_signal(seq, kind, count)) per
   * (destination rank, local expert), zero-token pairs included, after all the data (release: the data of the
   * call happens-before the owner's acquire of the signal). */
  q = 0;
  do
  :: q < NP ->
     d = q / EL; e = q % EL;
     i = IDX(d, ARR(kind), p, e, me);
#ifdef MUT_NO_ZERO_SIGNAL
     if
     :: SENDCNT(q) == 0 -> skip
     :: else ->
#endif
     if
     :: !SENDS_TO(d) -> skip                         /* no signal to a masked rank */
     :: else ->
     atomic {
       printf("rank %d call %d: signal seq=%d count=%d -> rank %d expert %d\n", me, gcall, cs,
              SENDCNT(q), d, e);
       /* (3) reuse safety, signal half: the signal replaces one its owner has consumed, in a region its owner is
        * not waiting on for another call (unless its owner ignores this writer: masked) */
       p3_reuse_safety = (MASKED_BY(d, me) || (sorig[i] <= cons[REG(d, ARR(kind), p)] &&
                          (rd[REG(d, ARR(kind), p)] == 0 || rd[REG(d, ARR(kind), p)] == gcall)));
       ASSERT_P3;
       sig[i] = SIG(cs, kind, SENDCNT(q));
       sorig[i] = gcall
     }
     fi;
     MAYBE_DIE;
#ifdef MUT_NO_ZERO_SIGNAL
     fi;
#endif
     q++
  :: else -> break
  od
}

inline send_half() {
  /* Call::begin_send (protocol.cc): seq + 1, or 0 while a call is open: then dispatch_send /
   * combine_send return Call::misuse before writing anything. */
  if
  :: open_seq != 0 ->
     printf("rank %d: send while call seq=%d is open -> kSplitMisuse\n", me, open_seq);
     record(E_MISUSE); failed = 1
#ifdef STICKY_ERRORS
  :: open_seq == 0 && broken ->
     /* Proposed fix (not in the code): after a timeout or mismatch the send half refuses to write anything. */
     printf("rank %d: send after a timeout/mismatch -> refused\n", me);
     failed = 1
#endif
  :: else ->
     /* Call::begin_send */
     cs = seq + 1;
     gcall++;
#if !SAME_PROGRAM
     kinds[me * (NCALLS + 1) + gcall] = kind;
#endif
     p = PARITY(cs);                                 /* dispatch_send / combine_send */
#ifdef COUNTS_NONDET
     atomic {
       /* this call's routing: no token at all (an empty rank), one token to every pair, or either alternation */
       if
       :: route = 0
       :: route = (1 << NP) - 1
       :: route = PATTERN(me, gcall)
       :: route = PATTERN(me, gcall + 1)
       fi
     }
#endif
#ifdef MUT_SIGNAL_FIRST
     /* No release/acquire order between the messages and their signal: the signals may be seen first. */
     if
     :: data_phase(); signal_phase()
     :: signal_phase(); data_phase()
     fi;
#else
     data_phase();
     signal_phase();
#endif
     /* Call::open_call (protocol.cc), from dispatch_send / combine_send: the call stays open
      * until its receive half. */
     open_seq = cs; open_kind = kind
  fi
}

/* ---- receive half: dispatch_recv (protocol.cc) / combine_recv (protocol.cc) ---- */


/* The wait of Call::wait_for_signals (protocol.cc), one pair j = pair_index(e, s) = e * R + s:
 *   ARRIVED_J  its own signal (acquire load) classifies as arrived;
 *   MISMATCH_J its own signal is a mismatch, or it is pending and the other kind's signal of the same parity and
 *              pair (acquire load) is a mismatch. */
#define OWN(j) sig[REG(me, ARR(kind), p) * NP + (j)]
#define CROSS(j) sig[REG(me, 1 - ARR(kind), p) * NP + (j)]
#define ARRIVED_J(j) ((j) >= NP || MASKED((j) % R) || ST(OWN(j), cs, kind) == ARRIVED)
#define MISMATCH_J(j) ((j) < NP && !MASKED((j) % R) && (ST(OWN(j), cs, kind) == MISMATCH || \
                       (ST(OWN(j), cs, kind) == PENDING && ST(CROSS(j), cs, kind) == MISMATCH)))
#ifdef ONE_SLOW
/* (EL = 2) the other ranks' signals are all in, one of the late rank's is missing */
#if R == 3
#define OTHERS_IN (ARRIVED_J(0) && ARRIVED_J(1) && ARRIVED_J(3) && ARRIVED_J(4))
#else
#define OTHERS_IN (ARRIVED_J(0) && ARRIVED_J(2))
#endif
#define TIMEOUT_ALLOWED (me == R - 1 || (OTHERS_IN && (!ARRIVED_J(R - 1) || !ARRIVED_J(2 * R - 1))))
#else
#define TIMEOUT_ALLOWED 1
#endif
/* The data slot the receive half reads for pair j (pair_index(e, s) = e * R + s) */
#define RSLOT(j) DSLOT(me, p, (j) / R, (j) % R, kind, gcall)

/* The outputs are read right away: write_dispatch_outputs (protocol.cc, from dispatch_recv) / combine_recv's
 * reduction, the pairs of every rank this rank does not mask. Reading at the earliest moment finds every unwritten
 * slot; a later write of another call is caught by property 3, and by the check at close_call (README). */
inline read_outputs() {
  j = 0;
  do
  :: j < NP && MASKED(j % R) -> j++                  /* a masked rank's pairs are not read */
  :: j < NP && !MASKED(j % R) ->
     /* (2) no stale signal: the accepted signal was stored by the sender's call with my ordinal */
     p2_no_stale_signal = (sorig[REG(me, ARR(kind), p) * NP + j] == gcall);
     assert(p2_no_stale_signal);
     /* (1) completeness: the count is the one sender j % R chose for (me, expert j / R) in this call, and every
      * token it announced is in place */
     p1_completeness = (SCNT(OWN(j)) == TRUECNT(j) && (TRUECNT(j) == 0 || tag[RSLOT(j)] == gcall));
     ASSERT_P1;
     j++
  :: else -> break
  od
}
#define ALL_ARRIVED (ARRIVED_J(0) && ARRIVED_J(1) && ARRIVED_J(2) && ARRIVED_J(3) && ARRIVED_J(4) && ARRIVED_J(5))
#define ANY_MISMATCH (MISMATCH_J(0) || MISMATCH_J(1) || MISMATCH_J(2) || MISMATCH_J(3) || MISMATCH_J(4) || \
                      MISMATCH_J(5))

inline recv_half() {
  /* Call::begin_recv (protocol.cc), from dispatch_recv / combine_recv: the open call of this
   * kind, else kSplitMisuse. The ticket check always passes here: a receive half gets the
   * ticket of its own send (README, "Not modelled"). */
  if
  :: open_seq == 0 || open_kind != kind ->
     printf("rank %d: receive half with no open call of its kind -> kSplitMisuse\n", me);
     record(E_MISUSE); failed = 1
  :: else ->
     cs = open_seq;
     p = PARITY(cs);
     rd[REG(me, ARR(kind), p)] = gcall;             /* ghost: from here until close_call the region is in use */
     rdd[DREG(me, p)] = gcall;
     MAYBE_DIE;
     /* Call::wait_for_signals (protocol.cc; dispatch_recv, combine_recv) polls the pending pairs,
      * pass after pass, until every pair has arrived, a pair shows a mismatch or the deadline passes
      * with pairs pending. A poll
      * changes nothing but local state, and a signal that has arrived stays so until close_call (the signal half
      * of property 3, asserted at every store), so the wait is one step: it blocks until all E_l x R signals
      * have arrived or a mismatch shows (a wait that never ends is a hang: spin reports an invalid end state).
      * With TIMEOUTS the deadline may pass at any moment while a signal is missing. */
     if
     :: atomic {
          (ALL_ARRIVED || ANY_MISMATCH) ->
          if
          :: ANY_MISMATCH ->                          /* -> Call::mismatch */
             printf("rank %d call %d: mismatch -> kSequenceMismatch\n", me, gcall);
             record(E_MISMATCH); failed = 1; broken = 1
          :: else ->
             printf("rank %d call %d: all %d signals of seq=%d arrived\n", me, gcall, NP, cs);
             read_outputs();
#if !SAME_PROGRAM
             /* (5) no silent mismatch: a receive half that succeeds for call n of kind X means every rank made
              * call n of kind X */
             j = 0;
             do
             :: j < R ->
                p5_mismatch_detected = (kinds[j * (NCALLS + 1) + gcall] == kind);
                assert(p5_mismatch_detected);
                j++
             :: else -> break
             od
#endif
          fi
        }
#if TIMEOUTS
     :: atomic {
          !ALL_ARRIVED ->                             /* -> Call::timeout */
          printf("rank %d call %d: timeout -> kTimeout\n", me, gcall);
          record(E_TIMEOUT); failed = 1; broken = 1
        }
#endif
#ifdef MASKING
     :: atomic {
          !ALL_ARRIVED && TIMEOUT_ALLOWED ->          /* -> Call::mask_silent (on_timeout="mask") */
          j = 0;
          do
          :: j < NP && !ARRIVED_J(j) -> mk[me] = mk[me] | (1 << (j % R)); j++
          :: j < NP && ARRIVED_J(j) -> j++
          :: else -> break
          od;
          printf("rank %d call %d: timeout -> mask %d, the call goes on\n", me, gcall, mk[me]);
          read_outputs()
        }
#endif
     fi;
     /* Call::close_call (protocol.cc): dispatch_recv / combine_recv, and after a failed wait
      * (dispatch_recv / combine_recv). */
     atomic {
       /* (1) completeness, continued: what the receive half read stayed intact until it returned */
       j = 0;
       do
       :: !failed && j < NP && MASKED(j % R) -> j++
       :: !failed && j < NP && !MASKED(j % R) ->
          p1_completeness = (TRUECNT(j) == 0 || tag[RSLOT(j)] == gcall);
          ASSERT_P1;
          j++
       :: else -> break
       od;
       seq = cs; open_seq = 0; open_kind = KNONE;
       cons[REG(me, ARR(kind), p)] = gcall;
       rd[REG(me, ARR(kind), p)] = 0;
       consd[DREG(me, p)] = gcall;
       rdd[DREG(me, p)] = 0
     }
  fi
}

proctype Rank(byte me) {
  /* RankState (layout.h), in this rank's region, read and written only by this rank's calls: local here. */
  byte seq, open_seq, open_kind, err;
  byte n, op, kind, phases, cs, p, q, d, e, i, j, gcall, route;
  bit broken;                /* STICKY_ERRORS: a timeout or mismatch was recorded on this rank */
  bit failed;
  n = 0;
  do
  :: n < NCALLS ->
#if SAME_PROGRAM
     atomic {
       if
       :: prog[n] == OP_END ->
          if
          :: prog[n] = OP_D
          :: prog[n] = OP_C
#if SPLIT_OPS
          :: prog[n] = OP_DS
          :: prog[n] = OP_CS
#endif
          fi
       :: else -> skip
       fi;
       op = prog[n];
       nread[n]++;
       if
       :: nread[n] == R -> prog[n] = OP_END; nread[n] = 0
       :: else -> skip
       fi
     }
#else
     if
     :: op = OP_END
     :: op = OP_D
     :: op = OP_C
#ifdef HALVES
     :: op = OP_DS
     :: op = OP_CS
     :: op = OP_DR
     :: op = OP_CR
#endif
     fi;
#endif
     if
     :: op == OP_END -> break
     :: else -> skip
     fi;
     MAYBE_DIE;
     /* The handler (cpu_handlers.cc: DispatchImpl / DispatchSendImpl / DispatchRecvImpl and the combine ones)
      * calls run() (protocol.cc) with its phases: the send half, then (if it succeeded) the receive half. */
     if
     :: op == OP_D -> kind = KD; phases = SEND_PHASE + RECV_PHASE
     :: op == OP_C -> kind = KC; phases = SEND_PHASE + RECV_PHASE
#if SAME_PROGRAM
     :: op == OP_DS -> kind = KD; phases = SEND_PHASE + RECV_PHASE   /* dispatch_send, then dispatch_recv */
     :: op == OP_CS -> kind = KC; phases = SEND_PHASE + RECV_PHASE
#else
     :: op == OP_DS -> kind = KD; phases = SEND_PHASE
     :: op == OP_CS -> kind = KC; phases = SEND_PHASE
#endif
     :: op == OP_DR -> kind = KD; phases = RECV_PHASE
     :: op == OP_CR -> kind = KC; phases = RECV_PHASE
     fi;
     if
     :: phases & SEND_PHASE -> send_half()
     :: else -> skip
     fi;
     /* SAME_PROGRAM's split forms return to XLA here (open_call wrote the ticket; begin_recv checks it) and the
      * receive half is the next handler call on this buffer; nothing else runs on the buffer in between. */
     if
     :: !failed && (phases & RECV_PHASE) -> recv_half()
     :: else -> skip
     fi;
#ifndef CONTINUE_AFTER_ERROR
     /* A failed call returns an ffi::Error (cpu_handlers.cc, to_ffi_error): the XLA execution fails, and
      * JAX refuses every later call on the buffer until buf.check() (jax_ll_ep/_jax_internals.py: settle_order_token). */
     if
     :: failed -> break
     :: else -> skip
     fi;
#else
     failed = 0;
#endif
     n++
  :: else -> break
  od;
#if !SAME_PROGRAM
  atomic {
    ncalls[me] = gcall;               /* calls whose send half ran */
    dangling[me] = (open_seq != 0);   /* a send whose receive half never ran (the program ended first) */
    errs[me] = err
  }
#else
  /* (4) with the same program on every rank, no call may end in an error (no false mismatch, no misuse) */
  p4_no_false_error = (err == E_OK);
  assert(p4_no_false_error);
#endif
#if defined(DEATH)
dead:                        /* (a killed rank ends here, at any step; the others must still end: property 4) */
#endif
  finished++
}

init {
  byte r, a, b;
  atomic {
    r = 0;
    do
    :: r < R -> run Rank(r); r++
    :: else -> break
    od
  }
  /* (4)/(5): every rank ends; a wait that never returns leaves this blocked and spin reports an invalid end state. */
  finished == R;
#if !SAME_PROGRAM
  /* (5) if no rank recorded an error and no rank ended with a send still open, every rank made the same calls
   * (follows from the completion check above; kept as a cross-check). */
  atomic {
    a = 0;
    r = 0;
    do
    :: r < R -> a = a + (errs[r] != E_OK || dangling[r] -> 1 : 0); r++
    :: else -> break
    od;
    if
    :: a == 0 ->
       r = 1;
       do
       :: r < R ->
          p5_mismatch_detected = (ncalls[r] == ncalls[0]);
          assert(p5_mismatch_detected);
          b = 1;
          do
          :: b <= ncalls[0] ->
             p5_mismatch_detected = (kinds[r * (NCALLS + 1) + b] == kinds[b]);
             assert(p5_mismatch_detected);
             b++
          :: else -> break
          od;
          r++
       :: else -> break
       od
    :: else -> skip
    fi
  }
#endif
}
