#include "addon/layer_extract.h"

#include "addon/zstd_api.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace microvm {

// ---- BlockPool ---------------------------------------------------------------------------------

BlockPool::~BlockPool() {
  for (auto& a : arenas_) munmap(a.first, a.second);
}

char* BlockPool::Carve() {
  constexpr size_t kHuge = 2 << 20;
  if (arena_left_ < block_size_) {
    size_t size = (block_size_ + kHuge - 1) / kHuge * kHuge;
    // Map one huge page more than needed and trim both ends: the arena starts on a 2 MiB boundary.
    void* p = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    uintptr_t start = reinterpret_cast<uintptr_t>(p);
    uintptr_t aligned = (start + kHuge - 1) & ~(static_cast<uintptr_t>(kHuge) - 1);
    if (aligned > start) munmap(p, aligned - start);
    if (start + kHuge > aligned) munmap(reinterpret_cast<void*>(aligned + size), start + kHuge - aligned);
    char* arena = reinterpret_cast<char*>(aligned);
    madvise(arena, size, MADV_HUGEPAGE);  // a hint: without huge pages it is ordinary memory
    arenas_.emplace_back(arena, size);
    arena_next_ = arena;
    arena_left_ = size;
  }
  char* b = arena_next_;
  arena_next_ += block_size_;
  arena_left_ -= block_size_;
  return b;
}

std::shared_ptr<char> BlockPool::Get(bool bounded) {
  char* block = nullptr;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (bounded) cv_.wait(lock, [this] { return cancelled_ || !free_.empty() || out_ < max_blocks_; });
    if (cancelled_) return nullptr;
    if (!free_.empty()) {
      block = free_.back();
      free_.pop_back();
    } else if ((block = Carve()) == nullptr) {
      exhausted_ = true;
      return nullptr;
    }
    out_++;
  }
  return std::shared_ptr<char>(block, [this](char* b) { Put(b); });
}

void BlockPool::Put(char* block) {
  std::lock_guard<std::mutex> lock(mutex_);
  free_.push_back(block);
  out_--;
  cv_.notify_one();
}

void BlockPool::Cancel() {
  std::lock_guard<std::mutex> lock(mutex_);
  cancelled_ = true;
  cv_.notify_all();
}

// ---- TeeWriter ---------------------------------------------------------------------------------

TeeWriter::TeeWriter(int fd) : fd_(fd) {
  thread_ = std::thread([this] { Run(); });
}

TeeWriter::~TeeWriter() {
  Cancel();
}

void TeeWriter::Push(std::shared_ptr<char> block, size_t size) {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [this] { return cancelled_ || queued_ < (8u << 20); });
  if (cancelled_ || !ok_) return;
  queued_ += size;
  queue_.emplace_back(std::move(block), size);
  cv_.notify_all();
}

void TeeWriter::Run() {
  for (;;) {
    std::pair<std::shared_ptr<char>, size_t> item;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return cancelled_ || !queue_.empty(); });
      if (cancelled_) return;
      item = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
    }
    bool ok = WriteAll(fd_, item.first.get(), item.second) == 0;
    item.first.reset();  // the block goes back to its pool before the producer is woken
    std::lock_guard<std::mutex> lock(mutex_);
    writing_ = false;
    queued_ -= item.second;
    if (!ok) {
      ok_ = false;
      queue_.clear();
      queued_ = 0;
    }
    cv_.notify_all();
  }
}

bool TeeWriter::Finish() {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [this] { return cancelled_ || (queue_.empty() && !writing_); });
  return ok_ && !cancelled_;
}

void TeeWriter::Cancel() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    cancelled_ = true;
    queue_.clear();
    queued_ = 0;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
}

// ---- helpers -----------------------------------------------------------------------------------

namespace {

const char kWhiteout[] = ".wh.";
const char kOpaque[] = ".wh..wh..opq";

std::string Quote(const std::string& s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < 200; i++) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

// Splits an archive path into components ('' and '.' dropped); false with `why` if refused.
bool Components(const std::string& p, std::vector<std::string>* out, std::string* why) {
  if (p.find('\0') != std::string::npos) {
    *why = "NUL in path";
    return false;
  }
  out->clear();
  size_t start = 0;
  while (start <= p.size()) {
    size_t end = p.find('/', start);
    if (end == std::string::npos) end = p.size();
    std::string c = p.substr(start, end - start);
    if (c == "..") {
      *why = "'..' in path";
      return false;
    }
    if (!c.empty() && c != ".") out->push_back(c);
    start = end + 1;
  }
  return true;
}

std::string Join(const std::vector<std::string>& comps, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; i++) s += (i ? "/" : "") + comps[i];
  return s;
}

std::string CString(const unsigned char* h, size_t start, size_t len) {
  const char* p = reinterpret_cast<const char*>(h) + start;
  size_t n = 0;
  while (n < len && p[n] != '\0') n++;
  return std::string(p, n);
}

// A numeric header field: base-256 when the top bit is set, else octal text.
bool Number(const unsigned char* h, size_t start, size_t len, uint64_t* out, std::string* why, const char* field) {
  if (h[start] & 0x80) {
    uint64_t v = h[start] & 0x7f;
    for (size_t i = 1; i < len; i++) {
      if (v > (UINT64_C(1) << 53) / 256) {
        *why = std::string(field) + " too large";
        return false;
      }
      v = v * 256 + h[start + i];
    }
    if (v > (UINT64_C(1) << 53)) {
      *why = std::string(field) + " too large";
      return false;
    }
    *out = v;
    return true;
  }
  std::string s = CString(h, start, len);
  size_t b = s.find_first_not_of(" \t\r\n\v\f");
  size_t e = s.find_last_not_of(" \t\r\n\v\f");
  s = b == std::string::npos ? "" : s.substr(b, e - b + 1);
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '7') {
      *why = std::string("bad octal ") + field + " " + Quote(s);
      return false;
    }
    v = v * 8 + static_cast<uint64_t>(c - '0');
  }
  *out = v;
  return true;
}

bool Decimal(const std::string& s, uint64_t max, uint64_t* out) {
  if (s.empty() || s.size() > 19) return false;
  uint64_t v = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<uint64_t>(c - '0');
  }
  if (v > max) return false;
  *out = v;
  return true;
}

bool ParsePax(const std::string& body, std::map<std::string, std::string>* out) {
  size_t i = 0;
  while (i < body.size()) {
    size_t sp = body.find(' ', i);
    if (sp == std::string::npos) break;
    uint64_t len;
    if (!Decimal(body.substr(i, sp - i), body.size(), &len) || len == 0 || i + len > body.size() ||
        sp + 1 > i + len - 1)
      return false;
    std::string rec = body.substr(sp + 1, i + len - 1 - (sp + 1));
    size_t eq = rec.find('=');
    if (eq != std::string::npos && eq > 0) (*out)[rec.substr(0, eq)] = rec.substr(eq + 1);
    i += len;
  }
  return true;
}

const char* TypeName(char t) {
  switch (t) {
    case '3':
      return "char";
    case '4':
      return "block";
    case '6':
      return "fifo";
    case 'S':
      return "sparse file";
    default:
      return "entry of unknown type";
  }
}

// Why an entry of this type is not created, for its warning.
const char* SkipReason(char t) {
  switch (t) {
    case '3':
    case '4':
    case '6':
      return "device nodes and FIFOs are not created";
    case 'S':
      return "sparse files in GNU or PAX sparse format are not supported; rebuild the layer without --sparse";
    default:
      return "unknown tar entry types are not applied";
  }
}

}  // namespace

// ---- LayerExtractor ----------------------------------------------------------------------------

int LayerExtractor::Open(const std::string& root, const ExtractOptions& options, std::unique_ptr<LayerExtractor>* out,
                         std::string* failed_at) {
  std::unique_ptr<LayerWriter> writer;
  int err = LayerWriter::Open(root, options.chown, options.override_xattr, &writer, failed_at);
  if (err != 0) return err;
  out->reset(new LayerExtractor(options, std::move(writer)));
  return 0;
}

LayerExtractor::LayerExtractor(const ExtractOptions& options, std::unique_ptr<LayerWriter> writer)
    : options_(options), writer_(std::move(writer)) {
  result_.bytes = result_bytes_ = options.bytes_before;
  result_.entries = result_entries_ = options.entries_before;
  if (options.tee_fd >= 0) tee_ = std::make_unique<TeeWriter>(options.tee_fd);
  thread_ = std::thread([this] { Run(); });
}

LayerExtractor::~LayerExtractor() {
  Cancel();
  writer_.reset();  // its queue holds blocks of the pools: empty it first
  if (zs_init_) inflateEnd(&zs_);
  if (zds_ != nullptr) Zstd()->free_dstream(zds_);
}

bool LayerExtractor::Write(const char* data, size_t size, size_t* queued) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (failed_ || cancelled_ || input_ended_) return false;
  // Socket reads come in every size: the last queued block (not yet taken by the parse thread)
  // is topped up first, so the input held is about what is queued, not a block per write.
  size_t off = 0;
  if (!input_.empty()) {
    Input& tail = input_.back();
    size_t n = std::min(size, in_pool_.block_size() - tail.size);
    std::memcpy(tail.block.get() + tail.size, data, n);
    tail.size += n;
    off = n;
  }
  while (off < size) {
    std::shared_ptr<char> b = in_pool_.Get(false);  // unbounded: never waits
    if (!b) {
      if (in_pool_.exhausted()) SetFailure("ERR_MICROVM_IMAGE_LAYER", "Cannot queue layer input: out of memory", lock);
      return false;
    }
    size_t n = std::min(size - off, in_pool_.block_size());
    std::memcpy(b.get(), data + off, n);
    input_.push_back(Input{std::move(b), n});
    off += n;
  }
  input_bytes_ += size;
  *queued = input_bytes_;
  cv_.notify_all();
  return true;
}

void LayerExtractor::End() {
  std::lock_guard<std::mutex> lock(mutex_);
  input_ended_ = true;
  cv_.notify_all();
}

bool LayerExtractor::Satisfied() const {
  if (failed_ || cancelled_) return true;
  return wait_done_ ? done_ : input_bytes_ <= wait_low_;
}

int LayerExtractor::Wait(size_t low, bool done, std::function<void()> on_ready) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (waiter_) return -1;
  wait_low_ = low;
  wait_done_ = done;
  if (Satisfied()) return 1;
  waiter_ = std::move(on_ready);
  return 0;
}

void LayerExtractor::Notify(std::unique_lock<std::mutex>& lock) {
  if (!waiter_ || !Satisfied()) return;
  std::function<void()> cb = std::move(waiter_);
  waiter_ = nullptr;
  lock.unlock();
  cb();
  lock.lock();
}

bool LayerExtractor::Failure(ExtractFailure* f) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (failed_) *f = failure_;
  return failed_;
}

bool LayerExtractor::Cancelled() {
  std::lock_guard<std::mutex> lock(mutex_);
  return cancelled_;
}

ExtractResult LayerExtractor::Result() {
  std::lock_guard<std::mutex> lock(mutex_);
  return result_;
}

void LayerExtractor::Cancel() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (!cancelled_) {
      cancelled_ = true;
      input_.clear();
      input_bytes_ = 0;
      cv_.notify_all();
      Notify(lock);
    }
  }
  in_pool_.Cancel();
  out_pool_.Cancel();
  if (writer_) writer_->Cancel();  // drops its queue (and the blocks it holds); wakes a parse thread waiting on it
  if (tee_) tee_->Cancel();        // likewise
  if (thread_.joinable()) thread_.join();
  // Only the parse thread (joined now) uses the writer: release it here, not at garbage
  // collection, so its descriptors under the root are closed once close() returns (a failed
  // extraction must not hold the cache's filesystem busy, nor a deleted tree's space).
  writer_.reset();
}

bool LayerExtractor::Fail(const std::string& code, const std::string& message) {
  std::unique_lock<std::mutex> lock(mutex_);
  SetFailure(code, message, lock);
  return false;
}

void LayerExtractor::SetFailure(const std::string& code, const std::string& message,
                                std::unique_lock<std::mutex>& lock) {
  if (!failed_ && !cancelled_) {
    failed_ = true;
    failure_.code = code;
    failure_.message = message;
    input_.clear();
    input_bytes_ = 0;
    cv_.notify_all();
  }
  Notify(lock);
}

bool LayerExtractor::FailFromWriter() {
  WriterFailure wf;
  std::unique_lock<std::mutex> lock(mutex_);
  if (!failed_ && !cancelled_ && writer_->Failure(&wf)) {
    failed_ = true;
    failure_.err = wf.err;
    failure_.entry = wf.entry;
    std::string at = wf.failed_at.empty() || wf.failed_at == wf.entry ? std::string() : " (at " + wf.failed_at + ")";
    failure_.message = wf.what + (wf.entry.empty() ? std::string() : " " + wf.entry) + at;
    input_.clear();
    input_bytes_ = 0;
  }
  Notify(lock);
  return false;
}

bool LayerExtractor::Push(LayerWriter::Op&& op) {
  if (writer_->Push(std::move(op))) return true;
  return FailFromWriter();
}

void LayerExtractor::Run() {
  if (options_.gzip) {
    if (inflateInit2(&zs_, 16 + MAX_WBITS) != Z_OK) {
      Fail("ERR_MICROVM_IMAGE_LAYER", "Cannot decompress layer: zlib would not start");
      return;
    }
    zs_init_ = true;
    if (!options_.check_trailer) inflateValidate(&zs_, 0);  // kept across inflateReset (next member)
  } else if (options_.zstd) {
    // The decoder's default window limit (128 MiB) refuses frames that would need more memory.
    zds_ = Zstd() ? Zstd()->create_dstream() : nullptr;
    if (zds_ == nullptr) {
      Fail("ERR_MICROVM_IMAGE_LAYER", "Cannot decompress layer: libzstd would not start");
      return;
    }
  }
  for (;;) {
    Input in;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return cancelled_ || failed_ || !input_.empty() || input_ended_; });
      if (cancelled_ || failed_) return;
      if (input_.empty()) break;  // ended
      in = std::move(input_.front());
      input_.pop_front();
      input_bytes_ -= in.size;
      Notify(lock);
    }
    result_compressed_ += in.size;
    if (tee_) tee_->Push(in.block, in.size);  // the cache copy, written on the tee's thread
    bool ok = options_.gzip   ? Inflate(in)
              : options_.zstd ? Unzstd(in)
                              : (result_uncompressed_ += in.size, Parse(in.block, in.block.get(), in.size));
    if (!ok) return;
  }
  Finish();
}

bool LayerExtractor::Inflate(const Input& in) {
  zs_.next_in = reinterpret_cast<Bytef*>(in.block.get());
  zs_.avail_in = static_cast<uInt>(in.size);
  bool pending = false;  // inflate filled the output: it may hold more without new input
  while (zs_.avail_in > 0 || pending) {
    if (trailing_) return true;
    if (member_ended_) {
      if (zs_.avail_in == 0) return true;
      // Another gzip member may follow (as gzip -d reads them); anything else is ignored.
      if (zs_.next_in[0] != 0x1f) {
        trailing_ = true;
        return true;
      }
      inflateReset(&zs_);
      member_ended_ = false;
    }
    if (!OutBlock()) return false;
    char* start = out_block_.get() + out_used_;
    zs_.next_out = reinterpret_cast<Bytef*>(start);
    zs_.avail_out = static_cast<uInt>(out_pool_.block_size() - out_used_);
    int rc = inflate(&zs_, Z_NO_FLUSH);
    size_t produced = reinterpret_cast<char*>(zs_.next_out) - start;
    pending = rc == Z_OK && zs_.avail_out == 0;
    if (rc == Z_STREAM_END) {
      member_ended_ = true;
    } else if (rc != Z_OK && rc != Z_BUF_ERROR) {
      return Fail("ERR_MICROVM_IMAGE_LAYER",
                  std::string("Cannot decompress layer: ") + (zs_.msg ? zs_.msg : "invalid data"));
    }
    if (produced > 0) {
      if (!Produced(start, produced)) return false;
    } else if (rc == Z_BUF_ERROR) {
      break;  // needs more input
    }
  }
  return true;
}

bool LayerExtractor::Unzstd(const Input& in) {
  const ZstdApi* z = Zstd();
  ZstdInBuffer zin{in.block.get(), in.size, 0};
  bool pending = false;  // the output filled up: the decoder may hold more without new input
  while (zin.pos < zin.size || pending) {
    if (!OutBlock()) return false;
    char* start = out_block_.get() + out_used_;
    ZstdOutBuffer zout{start, out_pool_.block_size() - out_used_, 0};
    size_t rc = z->decompress_stream(zds_, &zout, &zin);
    if (z->is_error(rc))
      return Fail("ERR_MICROVM_IMAGE_LAYER", std::string("Cannot decompress layer: ") + z->error_name(rc));
    zstd_frame_done_ = rc == 0;  // frames may follow one another: the next call starts the next
    pending = zout.pos == zout.size;
    if (zout.pos > 0) {
      if (!Produced(start, zout.pos)) return false;
    } else if (zin.pos == zin.size) {
      break;
    }
  }
  return true;
}

bool LayerExtractor::OutBlock() {
  if (out_block_ && out_used_ < out_pool_.block_size()) return true;
  out_block_ = out_pool_.Get(true);
  out_used_ = 0;
  if (out_block_) return true;
  if (!out_pool_.exhausted()) return false;  // cancelled
  return Fail("ERR_MICROVM_IMAGE_LAYER", "Cannot decompress layer: out of memory");
}

bool LayerExtractor::Produced(char* start, size_t n) {
  out_used_ += n;
  result_uncompressed_ += n;
  if (options_.max_ratio > 0 && result_uncompressed_ > (1u << 20) &&
      static_cast<double>(result_uncompressed_) / static_cast<double>(result_compressed_) > options_.max_ratio) {
    char msg[96];
    std::snprintf(msg, sizeof msg, "Image exceeds the decompression ratio (%g:1) limit", options_.max_ratio);
    return Fail("ERR_MICROVM_IMAGE_LIMIT", msg);
  }
  return Parse(out_block_, start, n);
}

bool LayerExtractor::Parse(const std::shared_ptr<char>& block, const char* p, size_t n) {
  while (n > 0) {
    if (remaining_ > 0) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(remaining_, n));
      if (meta_ != 0) {
        meta_buf_.append(p, k);
      } else if (file_open_) {
        LayerWriter::Op op;
        op.kind = LayerWriter::OpKind::kData;
        op.data = std::shared_ptr<const char>(block, p);  // shares the block
        op.size = k;
        if (!Push(std::move(op))) return false;
      }
      remaining_ -= k;
      p += k;
      n -= k;
      if (remaining_ == 0 && !FinishMember()) return false;
      continue;
    }
    if (padding_ > 0) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(padding_, n));
      padding_ -= k;
      p += k;
      n -= k;
      continue;
    }
    if (ended_) return true;  // blocks after the end marker
    size_t k = std::min(sizeof hdr_ - hdr_len_, n);
    std::memcpy(hdr_ + hdr_len_, p, k);
    hdr_len_ += k;
    p += k;
    n -= k;
    if (hdr_len_ == sizeof hdr_) {
      hdr_len_ = 0;
      if (!HeaderBlock(hdr_)) return false;
    }
  }
  return true;
}

bool LayerExtractor::HeaderBlock(const unsigned char* h) {
  bool zero = true;
  for (size_t i = 0; i < 512 && zero; i++) zero = h[i] == 0;
  if (zero) {
    ended_ = true;  // end-of-archive marker (a second zero block may follow)
    return true;
  }
  auto bad = [this](const std::string& why) {
    return Fail("ERR_MICROVM_IMAGE_LAYER", "Malformed layer archive: " + why);
  };
  uint64_t sum = 0;
  for (size_t i = 0; i < 512; i++) sum += (i >= 148 && i < 156) ? 0x20 : h[i];
  std::string why;
  uint64_t stored;
  if (!Number(h, 148, 8, &stored, &why, "checksum")) return bad(why);
  if (stored != sum) return bad("header checksum mismatch");
  char flag = static_cast<char>(h[156]);
  uint64_t size;
  if (!Number(h, 124, 12, &size, &why, "size")) return bad(why);
  if (flag == 'x' || flag == 'g' || flag == 'L' || flag == 'K') {
    if (size > options_.max_metadata) return bad("metadata member too large");
    meta_ = flag;
    meta_buf_.clear();
    remaining_ = size;
    padding_ = (512 - size % 512) % 512;
    if (size == 0) return FinishMember();
    return true;
  }
  Header hd;
  std::string magic(reinterpret_cast<const char*>(h) + 257, 5);
  std::string prefix = magic == "ustar" ? CString(h, 345, 155) : "";
  std::string name = CString(h, 0, 100);
  if (!prefix.empty()) name = prefix + "/" + name;
  std::map<std::string, std::string> pax = global_pax_;
  for (const auto& kv : pax_) pax[kv.first] = kv.second;
  auto get = [&pax](const char* key, std::string* v) {
    auto it = pax.find(key);
    if (it == pax.end()) return false;
    *v = it->second;
    return true;
  };
  std::string v;
  hd.path = get("path", &v) ? v : have_long_name_ ? long_name_ : name;
  hd.linkpath = get("linkpath", &v) ? v : have_long_link_ ? long_link_ : CString(h, 157, 100);
  hd.type = flag;
  // A PAX sparse file (GNU tar 1.14+ "GNU.sparse.*" records): its data is a sparse map plus the
  // stored blocks, not the file; skipped like an old GNU sparse member (type 'S'), with a warning.
  if ((flag == '0' || flag == '\0') && pax.lower_bound("GNU.sparse.") != pax.end() &&
      pax.lower_bound("GNU.sparse.")->first.rfind("GNU.sparse.", 0) == 0)
    hd.type = 'S';
  uint64_t n;
  if (!Number(h, 100, 8, &n, &why, "mode")) return bad(why);
  hd.mode = static_cast<uint32_t>(n & 07777);
  const uint64_t kMaxId = 0xffffffffu;
  // uid/gid: PAX decimal text, else the header's numeric field; both must fit 32 bits.
  auto id = [&](const char* key, size_t offset, uint32_t* out) {
    uint64_t x;
    if (get(key, &v) ? !Decimal(v, kMaxId, &x) : !Number(h, offset, 8, &x, &why, key)) return false;
    if (x > kMaxId) return false;
    *out = static_cast<uint32_t>(x);
    return true;
  };
  if (!id("uid", 108, &hd.uid) || !id("gid", 116, &hd.gid)) return bad(why.empty() ? "bad uid/gid" : why);
  if (get("size", &v)) {
    if (!Decimal(v, UINT64_C(1) << 53, &size)) return bad("bad size");
  }
  hd.size = size;
  hd.mtime_sec = 0;
  hd.mtime_nsec = 0;
  if (get("mtime", &v)) {
    char* end = nullptr;
    double t = std::strtod(v.c_str(), &end);
    if (end != v.c_str() && std::isfinite(t) && std::fabs(t) < 1e15) {
      double sec = std::floor(t);
      hd.mtime_sec = static_cast<long long>(sec);
      hd.mtime_nsec = std::min(999999999L, std::max(0L, static_cast<long>(std::llround((t - sec) * 1e9))));
    }
  } else {
    if (!Number(h, 136, 12, &n, &why, "mtime")) return bad(why);
    hd.mtime_sec = static_cast<long long>(n);
  }
  pax_.clear();
  have_long_name_ = have_long_link_ = false;
  long_name_.clear();
  long_link_.clear();
  bool is_file = flag == '0' || flag == '\0' || flag == '7';
  if (!Entry(hd)) return false;
  if (is_file) {
    in_file_ = true;
    remaining_ = hd.size;
    padding_ = (512 - hd.size % 512) % 512;
    if (hd.size == 0) return FinishMember();
  } else {
    remaining_ = 0;
    // A (non-standard) body on a non-file member is skipped.
    padding_ = hd.size + (512 - hd.size % 512) % 512;
  }
  return true;
}

bool LayerExtractor::FinishMember() {
  if (meta_ != 0) {
    char kind = meta_;
    meta_ = 0;
    if (kind == 'x' || kind == 'g') {
      std::map<std::string, std::string> parsed;
      if (!ParsePax(meta_buf_, &parsed))
        return Fail("ERR_MICROVM_IMAGE_LAYER", "Malformed layer archive: bad PAX record");
      if (kind == 'x')
        pax_ = parsed;
      else
        for (const auto& kv : parsed) global_pax_[kv.first] = kv.second;
    } else {
      std::string s = meta_buf_.substr(0, meta_buf_.find('\0'));
      if (kind == 'L') {
        long_name_ = s;
        have_long_name_ = true;
      } else {
        long_link_ = s;
        have_long_link_ = true;
      }
    }
    meta_buf_.clear();
    return true;
  }
  if (in_file_) {
    in_file_ = false;
    if (file_open_) {
      file_open_ = false;
      return Push(std::move(end_file_));
    }
  }
  return true;
}

bool LayerExtractor::Entry(const Header& h) {
  using Kind = LayerWriter::OpKind;
  if (++result_entries_ > options_.max_entries) {
    return Fail("ERR_MICROVM_IMAGE_LIMIT",
                "Image exceeds the entry count (" + std::to_string(options_.max_entries) + ") limit");
  }
  auto unsafe = [this, &h](const std::string& why) {
    return Fail("ERR_MICROVM_IMAGE_UNSAFE_ENTRY", "Refusing layer entry " + Quote(h.path) + ": " + why);
  };
  std::vector<std::string> comps;
  std::string why;
  if (!Components(h.path, &comps, &why)) return unsafe(why);
  if (comps.empty()) return true;  // "./" itself
  const std::string& name = comps.back();
  std::string key = Join(comps, comps.size());
  if (name == kOpaque) {
    // Children of this directory that this layer made stay; everything from lower layers goes.
    std::string prefix = comps.size() > 1 ? Join(comps, comps.size() - 1) + "/" : "";
    LayerWriter::Op op;
    op.kind = Kind::kClear;
    op.path.assign(comps.begin(), comps.end() - 1);
    for (auto it = created_.lower_bound(prefix); it != created_.end() && it->compare(0, prefix.size(), prefix) == 0;
         ++it) {
      std::string rest = it->substr(prefix.size());
      if (rest.find('/') == std::string::npos) op.names.push_back(rest);
    }
    return Push(std::move(op));
  }
  if (name.compare(0, sizeof kWhiteout - 1, kWhiteout) == 0) {
    if (name.size() == sizeof kWhiteout - 1) return unsafe("empty whiteout");
    std::vector<std::string> target(comps.begin(), comps.end() - 1);
    target.push_back(name.substr(sizeof kWhiteout - 1));
    if (created_.count(Join(target, target.size())) != 0) return true;  // this layer's own: kept
    LayerWriter::Op op;
    op.kind = Kind::kRemove;
    op.path = target;
    return Push(std::move(op));
  }
  EntryAttrs attrs;
  attrs.mode = h.mode;
  attrs.uid = h.uid;
  attrs.gid = h.gid;
  attrs.mtime_sec = h.mtime_sec;
  attrs.mtime_nsec = h.mtime_nsec;
  LayerWriter::Op op;
  op.path = comps;
  switch (h.type) {
    case '5':
      created_.insert(key);
      op.kind = Kind::kDir;
      dir_attrs_.emplace_back(comps, attrs);
      return Push(std::move(op));
    case '0':
    case '\0':
    case '7':
      // What headers claim: fails early, before any data is written.
      result_bytes_ += h.size;
      if (result_bytes_ > options_.max_bytes) {
        return Fail("ERR_MICROVM_IMAGE_LIMIT",
                    "Image exceeds the size (" + std::to_string(options_.max_bytes) + " bytes) limit");
      }
      created_.insert(key);
      op.kind = Kind::kFile;
      if (!Push(std::move(op))) return false;
      file_open_ = true;
      end_file_ = LayerWriter::Op();
      end_file_.kind = Kind::kEndFile;
      end_file_.attrs = attrs;
      end_file_.path = comps;
      return true;
    case '2':
      if (h.linkpath.find('\0') != std::string::npos) return unsafe("NUL in link target");
      created_.insert(key);
      op.kind = Kind::kSymlink;
      op.text = h.linkpath;
      op.attrs = attrs;
      return Push(std::move(op));
    case '1': {
      std::vector<std::string> target;
      if (!Components(h.linkpath, &target, &why)) return unsafe("hard link target " + Quote(h.linkpath) + ": " + why);
      if (target.empty()) return unsafe("hard link target " + Quote(h.linkpath) + ": empty");
      created_.insert(key);
      op.kind = Kind::kHardlink;
      op.names = target;
      return Push(std::move(op));
    }
    default:
      if (warnings_.size() < 1000) {
        warnings_.push_back(std::string("skipped ") + TypeName(h.type) + " " + h.path + " (" + SkipReason(h.type) +
                            ")");
      }
      return true;
  }
}

bool LayerExtractor::Finish() {
  if ((options_.gzip && !member_ended_) || (options_.zstd && !zstd_frame_done_)) {
    return Fail("ERR_MICROVM_IMAGE_LAYER", "Cannot decompress layer: unexpected end of file");
  }
  if (remaining_ > 0 || padding_ > 0 || (hdr_len_ > 0 && !ended_)) {
    return Fail("ERR_MICROVM_IMAGE_LAYER", "Malformed layer archive: truncated archive");
  }
  if (in_file_ && !FinishMember()) return false;
  // Directory attributes last (their contents changed their mtimes), deepest first.
  for (auto it = dir_attrs_.rbegin(); it != dir_attrs_.rend(); ++it) {
    LayerWriter::Op op;
    op.kind = LayerWriter::OpKind::kAttrs;
    op.path = it->first;
    op.attr_kind = EntryKind::kDir;
    op.attrs = it->second;
    if (!Push(std::move(op))) return false;
  }
  writer_->Drain();
  WriterFailure wf;
  if (writer_->Failure(&wf)) return FailFromWriter();
  bool tee_ok = tee_ && tee_->Finish();
  std::unique_lock<std::mutex> lock(mutex_);
  if (cancelled_) return false;
  result_.bytes = result_bytes_;
  result_.entries = result_entries_;
  result_.compressed = result_compressed_;
  result_.uncompressed = result_uncompressed_;
  result_.tee_ok = tee_ok;
  result_.warnings = warnings_;
  done_ = true;
  Notify(lock);
  return true;
}

}  // namespace microvm
