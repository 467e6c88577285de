/* tp.h - tensor parallelism: how a model is cut among the ranks of a worker group, and the step plan
 * that rank 0 broadcasts so that every rank runs the same steps.
 *
 * Cut (Megatron): rank r of N holds a contiguous range of KV heads with their query heads (Q, K, V
 * are column-parallel: it loads their rows) and a range of the feed-forward width (gate and up
 * column-parallel, down row-parallel: it loads down's columns); the output projection is
 * row-parallel too (the columns of its heads). Each row-parallel product is a partial sum that the
 * model adds over the ranks (comm_allreduce_sum_f32) before the residual; everything else (norms,
 * the residual stream, the embedding) is the same on every rank. Ranges are as even as they can
 * be: KV heads split floor(r * K / N), so with an uneven split rank 0, which also computes the
 * logits, gets the smaller share; the feed-forward width splits in whole 32-column blocks (a
 * quantized row's block), so a rank's columns of down start and end on block boundaries.
 *
 * Plan: rank 0 runs the scheduler; every model_forward and model_kv_move on rank 0 of a group first
 * broadcasts what it is about to do (a fixed header, then the batch's arrays), and the other ranks
 * (tp_follow) receive it and do the same on their shard: same block tables and slots, their own KV
 * heads, no logits. tp_stop ends the followers' loop.
 *
 * Threading: the model's (model.h). */
#ifndef FOLIO_TP_H
#define FOLIO_TP_H

#include "model.h"

#define TP_FF_ALIGN 32 /* feed-forward columns per unit of the split */

/* Rank `rank` of `size`'s share of model c; FL_EINVAL (naming the limit) when the model cannot be
 * cut that way: more ranks than KV heads, or than 32-wide blocks of the feed-forward width. */
int tp_shard_of(const model_config_t *c, int rank, int size, model_shard_t *s, fl_error_t *err);

/* Rank 0: the plan of a forward step / a KV move / the end, to the other ranks. */
int tp_send_forward(model_t *m, const model_batch_t *b, fl_error_t *err);
int tp_send_move(model_t *m, const int32_t *src, const int32_t *dst, int n, fl_error_t *err);
int tp_stop(model_t *m, fl_error_t *err);

/* KV block pulls (worker_peer.c), on rank 0 between steps: blocks[0..n) of kv read into out / written
 * from in, n blocks in the whole form (kv_cache_block_bytes_all of the model's KV heads) one after
 * another. In a group of several ranks each rank reads or writes its own heads of the same block
 * ids (a plan like a step's: the block tables are the same on every rank), and rank 0 gathers or
 * hands out the slices over the communicator; with one rank they are the blocks themselves. */
int tp_kv_read(model_t *m, kv_cache_t *kv, const int32_t *blocks, int n, uint8_t *out, fl_error_t *err);
/* The bytes of one block in that whole form. */
size_t tp_kv_block_bytes(const model_t *m, const kv_cache_t *kv);
int tp_kv_write(model_t *m, kv_cache_t *kv, const int32_t *blocks, int n, const uint8_t *in, fl_error_t *err);

/* A rank other than 0: runs rank 0's plans on its shard until tp_stop (FL_OK) or a failure (the
 * communicator's, or a plan that this rank cannot run: the error). */
int tp_follow(model_t *m, kv_cache_t *kv, fl_error_t *err);

/* Right after the ranks join: rank 0's sizes to the others, and the group refused on every rank
 * (FL_EINVAL) when a rank was started with another model or other flags (every size equal, and at
 * least rank 0's KV blocks). */
int tp_check_group(model_t *m, const kv_cache_t *kv, fl_error_t *err);

/* Ints of the plan buffer model_new allocates (m->plan). */
size_t tp_plan_ints(const model_t *m);

#endif
