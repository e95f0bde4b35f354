// One image layer, from its (compressed) bytes to files under the root, off the JS thread.
//
//   JS thread      Write(chunk) ── copied into a pooled input block ──┐
//   parse thread   gunzip into pooled 1 MiB blocks, tar parsing, the layer rules (below)
//   write thread   LayerWriter (extract.h): creates, writes, attributes, removals
//
// File data is never copied after decompression: a data op shares the block it was inflated
// into, and the block goes back to the pool when the write thread is done with it. Blocks are
// reused rather than freed because on these machines a first touch of fresh memory costs more
// than decompressing into it (bench/pull.js). The output pool is bounded, which is the
// backpressure between parsing and writing; JS bounds the input side with Wait().
//
// The layer rules (layers are hostile input): a path with a NUL or a '..' component is refused;
// OCI whiteouts (`.wh.NAME`, opaque `.wh..wh..opq`) remove entries of lower layers only; device
// nodes and FIFOs are skipped with a warning; caps on uncompressed bytes (as headers claim them,
// before any data is written), entry count, and the decompression ratio. Everything is created
// through LayerWriter, which never leaves the root whatever the paths and links say.
#pragma once

#include <zlib.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "addon/extract.h"

namespace microvm {

// Fixed-size blocks handed out as shared pointers that return to the pool when released. Blocks
// are carved from 2 MiB-aligned arenas marked for transparent huge pages: a first touch of fresh
// memory is one fault per 2 MiB instead of 512 (on the VMs this was measured on, a 4 KiB fault
// costs ~15 us: 8 MiB of 4 KiB pages ~30 ms, as huge pages well under 1 ms when the kernel has
// them). block_size must divide 2 MiB or be a multiple of it.
class BlockPool {
 public:
  BlockPool(size_t block_size, size_t max_blocks) : block_size_(block_size), max_blocks_(max_blocks) {}
  ~BlockPool();
  BlockPool(const BlockPool&) = delete;
  BlockPool& operator=(const BlockPool&) = delete;
  // A free block; waits while max_blocks are out (null once cancelled). bounded=false never waits.
  std::shared_ptr<char> Get(bool bounded);
  void Cancel();
  size_t block_size() const { return block_size_; }
  // Get() returned null because memory for a new block could not be mapped (not a cancel).
  bool exhausted() {
    std::lock_guard<std::mutex> lock(mutex_);
    return exhausted_;
  }

 private:
  void Put(char* block);
  char* Carve();  // a new block (mutex_ held); null if memory is exhausted
  const size_t block_size_;
  const size_t max_blocks_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<char*> free_;
  std::vector<std::pair<char*, size_t>> arenas_;
  char* arena_next_ = nullptr;
  size_t arena_left_ = 0;
  size_t out_ = 0;
  bool cancelled_ = false;
  bool exhausted_ = false;
};

// Writes blocks to a descriptor on its own thread (the blob cache copy of a layer's compressed
// bytes), so the parse thread only parses; at most 8 MiB wait. Best effort: a failed write stops
// the copy, never the extraction.
class TeeWriter {
 public:
  explicit TeeWriter(int fd);
  ~TeeWriter();  // Cancel()
  TeeWriter(const TeeWriter&) = delete;
  TeeWriter& operator=(const TeeWriter&) = delete;
  // Queues a block (shared, not copied); waits while 8 MiB are queued.
  void Push(std::shared_ptr<char> block, size_t size);
  // Waits until everything queued is written; true if every byte reached the descriptor (and
  // nothing was cancelled).
  bool Finish();
  // Drops what is queued and joins the thread: nothing is written after this returns.
  void Cancel();

 private:
  void Run();
  const int fd_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<std::shared_ptr<char>, size_t>> queue_;
  size_t queued_ = 0;
  bool writing_ = false;
  bool cancelled_ = false;
  bool ok_ = true;
  std::thread thread_;  // joined only by Cancel() (from the owner's thread)
};

struct ExtractOptions {
  bool gzip = true;             // else the input is the tar itself (or zstd)
  bool zstd = false;            // zstd frames, through libzstd (Zstd() must not be null)
  bool chown = false;           // privileged: set owners
  bool override_xattr = false;  // else: user.containers.override_stat
  uint64_t max_bytes = 0;
  uint64_t max_entries = 0;
  double max_ratio = 0;       // gzip and zstd; 0: no cap
  uint64_t bytes_before = 0;  // totals of the image's earlier layers (the caps are per image)
  uint64_t entries_before = 0;
  size_t max_metadata = 1 << 20;
  int tee_fd = -1;  // also write the input bytes here (the blob cache copy); not owned
  // Check each gzip member's trailer (CRC-32 and length). Off only when the caller verifies a
  // digest of the compressed bytes before it trusts the result: the trailer then adds nothing
  // but the CRC's ~10% of the inflate time.
  bool check_trailer = true;
};

// The first failure: `code` is an ERR_MICROVM_* code for a refused layer, or empty with `err`
// (an errno) when a filesystem call failed (then `entry` names the archive path).
struct ExtractFailure {
  std::string code;
  std::string message;
  int err = 0;
  std::string entry;
};

struct ExtractResult {
  uint64_t bytes = 0;  // image totals including this layer
  uint64_t entries = 0;
  uint64_t compressed = 0;
  uint64_t uncompressed = 0;
  bool tee_ok = false;  // every input byte reached tee_fd
  std::vector<std::string> warnings;
};

class LayerExtractor {
 public:
  static int Open(const std::string& root, const ExtractOptions& options, std::unique_ptr<LayerExtractor>* out,
                  std::string* failed_at);
  ~LayerExtractor();  // Cancel()

  // Queues input bytes (copied). False once failed or cancelled. Returns the queued input bytes
  // in *queued.
  bool Write(const char* data, size_t size, size_t* queued);
  // No more input.
  void End();
  // Calls on_ready (from a worker thread) when at most `low` input bytes are queued — with
  // `done`, when the layer is completely applied — or on failure or cancellation. Returns 0
  // (on_ready will be called), 1 (already so; on_ready is not called), -1 (a waiter is pending).
  int Wait(size_t low, bool done, std::function<void()> on_ready);
  bool Failure(ExtractFailure* f);
  bool Cancelled();
  ExtractResult Result();
  // Stops every thread and drops everything queued: nothing is written after this returns.
  void Cancel();

 private:
  struct Input {
    std::shared_ptr<char> block;
    size_t size;
  };
  struct Header {
    std::string path;
    char type;  // tar type flag
    uint32_t mode, uid, gid;
    uint64_t size;
    long long mtime_sec;
    long mtime_nsec;
    std::string linkpath;
  };

  LayerExtractor(const ExtractOptions& options, std::unique_ptr<LayerWriter> writer);
  void Run();
  bool Fail(const std::string& code, const std::string& message);
  // Records the first failure and wakes everyone (mutex_ held through `lock`).
  void SetFailure(const std::string& code, const std::string& message, std::unique_lock<std::mutex>& lock);
  bool FailFromWriter();
  bool Push(LayerWriter::Op&& op);
  bool Inflate(const Input& in);
  bool Unzstd(const Input& in);
  bool OutBlock();                       // a block with room in out_block_ (false: cancelled or failed)
  bool Produced(char* start, size_t n);  // decompressed bytes at start: counted, capped, parsed
  bool Parse(const std::shared_ptr<char>& block, const char* p, size_t n);
  bool HeaderBlock(const unsigned char* h);
  bool FinishMember();
  bool Entry(const Header& h);
  bool Finish();
  bool Satisfied() const;
  void Notify(std::unique_lock<std::mutex>& lock);

  const ExtractOptions options_;
  BlockPool in_pool_{256 * 1024, 0};
  BlockPool out_pool_{1 << 20, 8};
  std::unique_ptr<LayerWriter> writer_;

  // Parse thread only.
  z_stream zs_{};
  bool zs_init_ = false;
  bool member_ended_ = false;     // between gzip members (or after the last)
  bool trailing_ = false;         // bytes after the last member: ignored
  void* zds_ = nullptr;           // ZSTD_DStream
  bool zstd_frame_done_ = false;  // the last zstd call completed a frame (false before any)
  std::shared_ptr<char> out_block_;
  size_t out_used_ = 0;
  unsigned char hdr_[512];
  size_t hdr_len_ = 0;
  uint64_t remaining_ = 0;  // data (or metadata) bytes of the current member still to come
  uint64_t padding_ = 0;
  char meta_ = 0;  // 'x', 'g', 'L', 'K' while reading such a member
  std::string meta_buf_;
  std::map<std::string, std::string> pax_, global_pax_;
  std::string long_name_, long_link_;
  bool have_long_name_ = false, have_long_link_ = false;
  bool ended_ = false;  // end-of-archive block seen
  bool in_file_ = false;
  bool file_open_ = false;  // the current file member is being written (not a whiteout marker)
  LayerWriter::Op end_file_;
  uint64_t result_bytes_ = 0, result_entries_ = 0, result_compressed_ = 0, result_uncompressed_ = 0;
  std::vector<std::string> warnings_;
  std::unique_ptr<TeeWriter> tee_;  // when options_.tee_fd >= 0
  std::set<std::string> created_;
  std::vector<std::pair<std::vector<std::string>, EntryAttrs>> dir_attrs_;

  // Shared, under mutex_.
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Input> input_;
  size_t input_bytes_ = 0;
  bool input_ended_ = false;
  bool done_ = false;
  bool failed_ = false;
  bool cancelled_ = false;
  ExtractFailure failure_;
  ExtractResult result_;
  std::function<void()> waiter_;
  size_t wait_low_ = 0;
  bool wait_done_ = false;
  std::thread thread_;
};

}  // namespace microvm
