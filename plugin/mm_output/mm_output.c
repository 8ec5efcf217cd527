/*
 * mm_output: PostgreSQL's own pgoutput, minus the echoes a subscriber
 * already has.
 *
 * Every transaction a peer applies for another node is decoded again by
 * that peer's walsenders and sent to the remaining nodes (an "echo"). A
 * node that was online in the echo's generation already holds it (it voted
 * on it, or caught up past it), and drops it on arrival (runtime/src/pg/
 * receiver.rs). Sending it costs a walsender a message and a send() per row
 * and the receiver its parsing: on a 1M-row COPY through a three-node
 * cluster the four echo walsenders spent more CPU than the origin's two.
 *
 * This plugin loads pgoutput and passes every callback through, except that
 * with the options below it leaves out, whole, a transaction that
 * - was prepared under an mm gid ("mm-<origin>-<boot>.<seq>-<gen>") whose
 *   origin is not the node this stream comes from (`mm_origin`), and whose
 *   origin is the subscriber itself (`mm_me`) or whose generation is at most
 *   `mm_skip_upto`: the subscriber's last online generation when it started
 *   the stream, a lower bound of it from then on, so a left-out echo is one
 *   the receiver would have dropped (docs/protocol.md, "Echo filter");
 * - or was committed in one phase by a replication origin (a replay or a
 *   resync of another node's rows, which the receiver never applies).
 * Everything else, the origin's own transactions, non-transactional
 * messages and keepalives included, is pgoutput's output unchanged, so the
 * runtime's pgoutput parser reads this plugin's stream as is.
 *
 * With `mm_batch 'on'` the messages of one transaction leave in few CopyData
 * messages instead of one each (the walsender flushes every CopyData with a
 * send(): one per row). Such a CopyData's payload is the byte '~' and then
 * frames of a 4-byte big-endian length and one pgoutput message, in order;
 * its header's WAL end is the last message's. A batch is sent at the end of
 * each transaction (prepare, commit, their decisions), past BATCH_BYTES, and
 * before any message outside a transaction (runtime/src/pg/replication/
 * conn.rs reads it).
 *
 * Without the options the plugin is exactly pgoutput. Why C and not a
 * library: an output plugin is a shared object loaded by the server; there
 * is no other way to decide inside the walsender what it sends.
 */
#include "postgres.h"

#include "commands/defrem.h"
#include "fmgr.h"
#include "nodes/pg_list.h"
#include "replication/logical.h"
#include "replication/origin.h"
#include "replication/output_plugin.h"
#include "replication/reorderbuffer.h"

PG_MODULE_MAGIC;

extern void _PG_output_plugin_init(OutputPluginCallbacks *cb);

/* pgoutput's callbacks, which this plugin delegates to. */
static OutputPluginCallbacks inner;

/* The stream's options (see the header comment). */
static bool filtering = false;
static uint64 opt_me = 0;
static uint64 opt_origin = 0;
static uint64 opt_skip_upto = 0;

/* The transaction being left out, while its callbacks run (decoding runs one
 * transaction at a time in a process). */
static TransactionId skipping = InvalidTransactionId;

/* Batching (mm_batch): the walsender's writer callbacks, wrapped. */
#define BATCH_BYTES (256 * 1024)
#define BATCH_TAG '~'
#define XLOGDATA_HEADER (1 + 8 + 8 + 8)
static bool batching = false;
static LogicalOutputPluginWriterPrepareWrite walsender_prepare_write;
static LogicalOutputPluginWriterWrite walsender_write;
static bool batch_open = false;
static int	frame_start = 0;
static XLogRecPtr batch_end = InvalidXLogRecPtr;
/* Set while a callback runs whose output may wait for the transaction's end. */
static bool may_defer = false;

static void
put_u32(char *at, uint32 v)
{
	at[0] = (char) (v >> 24);
	at[1] = (char) (v >> 16);
	at[2] = (char) (v >> 8);
	at[3] = (char) v;
}

static void
put_u64(char *at, uint64 v)
{
	put_u32(at, (uint32) (v >> 32));
	put_u32(at + 4, (uint32) v);
}

/* Hands the open batch to the walsender, its header's WAL end (walEnd) set
 * to the last message's position. */
static void
batch_send(LogicalDecodingContext *ctx, XLogRecPtr lsn, TransactionId xid, bool last_write)
{
	if (ctx->out->len >= XLOGDATA_HEADER && batch_end != InvalidXLogRecPtr)
		put_u64(ctx->out->data + 1 + 8, batch_end);
	batch_open = false;
	walsender_write(ctx, lsn, xid, last_write);
}

static void
batch_prepare_write(LogicalDecodingContext *ctx, XLogRecPtr lsn, TransactionId xid,
					bool last_write)
{
	if (!batch_open)
	{
		walsender_prepare_write(ctx, lsn, xid, last_write);
		appendStringInfoChar(ctx->out, BATCH_TAG);
		batch_open = true;
		batch_end = InvalidXLogRecPtr;
	}
	frame_start = ctx->out->len;
	appendBinaryStringInfo(ctx->out, "\0\0\0\0", 4);
}

static void
batch_write(LogicalDecodingContext *ctx, XLogRecPtr lsn, TransactionId xid, bool last_write)
{
	put_u32(ctx->out->data + frame_start, (uint32) (ctx->out->len - frame_start - 4));
	if (last_write && lsn > batch_end)
		batch_end = lsn;
	if (may_defer && ctx->out->len < BATCH_BYTES)
		return;
	batch_send(ctx, lsn, xid, last_write);
}

/* Sends what a transaction's callbacks left in the batch. */
static void
batch_flush(LogicalDecodingContext *ctx)
{
	if (batch_open)
		batch_send(ctx, ctx->write_location, ctx->write_xid, true);
}

/* Parses "mm-<origin>-<boot>.<seq>-<gen>" (core/src/ids.rs); false if the
 * gid is not an mm gid. */
static bool
parse_gid(const char *gid, uint64 *origin, uint64 *gen)
{
	unsigned long long o,
				b,
				s,
				g;
	int			used = 0;

	if (gid == NULL || strncmp(gid, "mm-", 3) != 0)
		return false;
	if (sscanf(gid, "mm-%llu-%llu.%llu-%llu%n", &o, &b, &s, &g, &used) != 4)
		return false;
	if (gid[used] != '\0')
		return false;
	*origin = o;
	*gen = g;
	return true;
}

/* Whether the subscriber already has the prepared transaction `gid`. */
static bool
echo_not_needed(const char *gid)
{
	uint64		origin,
				gen;

	if (!filtering || !parse_gid(gid, &origin, &gen))
		return false;
	if (origin == opt_origin)
		return false;			/* the stream's own transaction */
	return origin == opt_me || gen <= opt_skip_upto;
}

static bool
skipped(ReorderBufferTXN *txn)
{
	return TransactionIdIsValid(skipping) && txn != NULL && txn->xid == skipping;
}

static uint64
option_u64(DefElem *elem)
{
	char	   *s = defGetString(elem);
	char	   *end = NULL;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno != 0 || end == s || *end != '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("mm_output: option \"%s\" must be an unsigned integer, got \"%s\"",
						elem->defname, s)));
	return (uint64) v;
}

static void
mm_startup(LogicalDecodingContext *ctx, OutputPluginOptions *opt, bool is_init)
{
	ListCell   *lc;
	int			seen = 0;

	filtering = false;
	skipping = InvalidTransactionId;
	batching = false;
	batch_open = false;
	may_defer = false;
	/* Take this plugin's options out: pgoutput refuses options it does not know. */
	foreach(lc, ctx->output_plugin_options)
	{
		DefElem    *elem = lfirst(lc);

		if (strcmp(elem->defname, "mm_me") == 0)
			opt_me = option_u64(elem);
		else if (strcmp(elem->defname, "mm_origin") == 0)
			opt_origin = option_u64(elem);
		else if (strcmp(elem->defname, "mm_skip_upto") == 0)
			opt_skip_upto = option_u64(elem);
		else if (strcmp(elem->defname, "mm_batch") == 0)
		{
			batching = defGetBoolean(elem);
			ctx->output_plugin_options = foreach_delete_current(ctx->output_plugin_options, lc);
			continue;
		}
		else
			continue;
		seen |= strcmp(elem->defname, "mm_me") == 0 ? 1 :
			strcmp(elem->defname, "mm_origin") == 0 ? 2 : 4;
		ctx->output_plugin_options = foreach_delete_current(ctx->output_plugin_options, lc);
	}
	if (seen != 0 && seen != 7)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("mm_output: options mm_me, mm_origin and mm_skip_upto go together")));
	filtering = seen == 7;
	inner.startup_cb(ctx, opt, is_init);
	if (batching && !is_init)
	{
		walsender_prepare_write = ctx->prepare_write;
		walsender_write = ctx->write;
		ctx->prepare_write = batch_prepare_write;
		ctx->write = batch_write;
	}
}

/* At a transaction's first callback: leave it out if `skip`. */
static bool
starts_skipped(ReorderBufferTXN *txn, bool skip)
{
	skipping = skip ? txn->xid : InvalidTransactionId;
	return skip;
}

/* At a transaction's last callback: true if it was left out (the walsender
 * then moves the slot past it, as past an empty transaction). */
static bool
ends_skipped(LogicalDecodingContext *ctx, ReorderBufferTXN *txn)
{
	if (!skipped(txn))
		return false;
	skipping = InvalidTransactionId;
	OutputPluginUpdateProgress(ctx, true);
	return true;
}

static void
mm_begin(LogicalDecodingContext *ctx, ReorderBufferTXN *txn)
{
	if (starts_skipped(txn, filtering && txn->origin_id != InvalidRepOriginId))
		return;
	may_defer = true;
	inner.begin_cb(ctx, txn);
	may_defer = false;
}

static void
mm_commit(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr commit_lsn)
{
	if (ends_skipped(ctx, txn))
		return;
	inner.commit_cb(ctx, txn, commit_lsn);
	batch_flush(ctx);
}

static void
mm_change(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, Relation rel,
		  ReorderBufferChange *change)
{
	if (skipped(txn))
		return;
	may_defer = true;
	inner.change_cb(ctx, txn, rel, change);
	may_defer = false;
}

static void
mm_truncate(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, int nrelations,
			Relation relations[], ReorderBufferChange *change)
{
	if (skipped(txn))
		return;
	may_defer = true;
	inner.truncate_cb(ctx, txn, nrelations, relations, change);
	may_defer = false;
}

static void
mm_message(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr lsn,
		   bool transactional, const char *prefix, Size size, const char *message)
{
	if (transactional && skipped(txn))
		return;
	may_defer = transactional;
	inner.message_cb(ctx, txn, lsn, transactional, prefix, size, message);
	may_defer = false;
}

static void
mm_begin_prepare(LogicalDecodingContext *ctx, ReorderBufferTXN *txn)
{
	if (starts_skipped(txn, echo_not_needed(txn->gid)))
		return;
	may_defer = true;
	inner.begin_prepare_cb(ctx, txn);
	may_defer = false;
}

static void
mm_prepare(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr prepare_lsn)
{
	if (ends_skipped(ctx, txn))
		return;
	inner.prepare_cb(ctx, txn, prepare_lsn);
	batch_flush(ctx);
}

static void
mm_commit_prepared(LogicalDecodingContext *ctx, ReorderBufferTXN *txn, XLogRecPtr commit_lsn)
{
	if (echo_not_needed(txn->gid))
	{
		OutputPluginUpdateProgress(ctx, true);
		return;
	}
	inner.commit_prepared_cb(ctx, txn, commit_lsn);
	batch_flush(ctx);
}

static void
mm_rollback_prepared(LogicalDecodingContext *ctx, ReorderBufferTXN *txn,
					 XLogRecPtr prepare_end_lsn, TimestampTz prepare_time)
{
	if (echo_not_needed(txn->gid))
	{
		OutputPluginUpdateProgress(ctx, true);
		return;
	}
	inner.rollback_prepared_cb(ctx, txn, prepare_end_lsn, prepare_time);
	batch_flush(ctx);
}

void
_PG_output_plugin_init(OutputPluginCallbacks *cb)
{
	LogicalOutputPluginInit pgoutput_init;

	pgoutput_init = (LogicalOutputPluginInit)
		load_external_function("pgoutput", "_PG_output_plugin_init", true, NULL);
	memset(&inner, 0, sizeof(inner));
	pgoutput_init(&inner);
	*cb = inner;
	cb->startup_cb = mm_startup;
	cb->begin_cb = mm_begin;
	cb->commit_cb = mm_commit;
	cb->change_cb = mm_change;
	cb->truncate_cb = mm_truncate;
	cb->message_cb = mm_message;
	cb->begin_prepare_cb = mm_begin_prepare;
	cb->prepare_cb = mm_prepare;
	cb->commit_prepared_cb = mm_commit_prepared;
	cb->rollback_prepared_cb = mm_rollback_prepared;
}
