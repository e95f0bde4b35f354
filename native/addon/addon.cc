// The N-API addon: the only native surface Node sees. lib/native.ts is the only file that loads
// it and gives it TypeScript types. Policy (search order, defaults, validation) lives in
// TypeScript; this file receives validated values and acts.
//
// Exports:
//   errnoName(errno)                       -> "EINVAL"
//   probeFirmware(candidate)               -> Promise<FirmwareProbe>   (off the JS thread)
//   readFirmwareKernel(path)               -> Promise<{ ...FirmwareProbe, kernel: Buffer }>
//   probeLibkrun(path)                     -> Promise<{ path, features }>
//   createContext(libkrunPath, fwPath)     -> Promise<KrunContext>
//   checkPlan(planJson)                    -> undefined or throws (parse only, no libkrun)
//   validatePlan(planJson)                 -> Promise<undefined> (create ctx, apply, free)
//   writeFileBeneath(root, components, data, mode, uid, gid, dirAttrs)
//                                          -> undefined or throws (no symlink is ever followed)
//   KrunContext                            -> class; one libkrun configuration context
#include <fcntl.h>
#include <napi.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "addon/beneath.h"
#include "addon/extract.h"
#include "addon/firmware.h"
#include "addon/layer_extract.h"
#include "addon/tree_copy.h"
#include "addon/zstd_api.h"
#include "common/errno_names.h"
#include "common/krun_api.h"
#include "common/plan.h"

namespace microvm {
namespace {

// ---- errors ----------------------------------------------------------------------------------

Napi::Error KrunErrorFor(Napi::Env env, const KrunFailure& f) {
  int err = -f.rc;
  std::string message = f.syscall + " failed: " + ErrnoName(err) + " (" + std::strerror(err) + ")";
  if (!f.detail.empty()) message += ": " + f.detail;
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, f.rc));
  e.Set("syscall", Napi::String::New(env, f.syscall));
  return e;
}

Napi::Error CodedError(Napi::Env env, const char* code, const std::string& message) {
  Napi::Error e = Napi::Error::New(env, message);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

// A failed filesystem call: "<what>: ENAME (strerror)", with code (the errno name), errno
// (negative, as Node's own errors) and path (where it failed).
Napi::Error PathError(Napi::Env env, const std::string& what, int err, const std::string& path) {
  Napi::Error e = Napi::Error::New(env, what + ": " + ErrnoName(err) + " (" + std::strerror(err) + ")");
  e.Set("code", Napi::String::New(env, ErrnoName(err)));
  e.Set("errno", Napi::Number::New(env, -err));
  e.Set("path", Napi::String::New(env, path));
  return e;
}

// ---- live contexts ---------------------------------------------------------------------------
// Every context the addon created, by a process-unique token. A context is freed exactly once:
// by free(), by the JS finalizer, or by the environment cleanup hook (worker exit, process exit),
// whichever comes first. Tokens (not pointers) are handed to the hook so nothing dangles.

struct LiveContext {
  const KrunApi* api;
  uint32_t ctx;
};

std::mutex g_live_mutex;
std::map<uint64_t, LiveContext>& Live() {
  static auto* live = new std::map<uint64_t, LiveContext>();
  return *live;
}
std::atomic<uint64_t> g_next_token{1};

uint64_t Register(const KrunApi* api, uint32_t ctx) {
  uint64_t token = g_next_token++;
  std::lock_guard<std::mutex> lock(g_live_mutex);
  Live()[token] = LiveContext{api, ctx};
  return token;
}

// Frees the context behind `token` if it is still live. Returns false with `failure` only when
// libkrun itself refused.
bool Release(uint64_t token, KrunFailure* failure) {
  LiveContext lc;
  {
    std::lock_guard<std::mutex> lock(g_live_mutex);
    auto it = Live().find(token);
    if (it == Live().end()) return true;
    lc = it->second;
    Live().erase(it);
  }
  return KrunFreeCtx(*lc.api, lc.ctx, failure);
}

void CleanupHook(void* arg) {
  KrunFailure ignored;
  Release(static_cast<uint64_t>(reinterpret_cast<uintptr_t>(arg)), &ignored);
}

// ---- KrunContext -----------------------------------------------------------------------------

struct AddonData {
  Napi::FunctionReference context_ctor;
};

class KrunContextWrap : public Napi::ObjectWrap<KrunContextWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "KrunContext",
                       {
                           InstanceAccessor<&KrunContextWrap::GetId>("id"),
                           InstanceAccessor<&KrunContextWrap::GetFreed>("freed"),
                           InstanceAccessor<&KrunContextWrap::GetLibkrunPath>("libkrunPath"),
                           InstanceMethod<&KrunContextWrap::SetLogLevel>("setLogLevel"),
                           InstanceMethod<&KrunContextWrap::SetVmConfig>("setVmConfig"),
                           InstanceMethod<&KrunContextWrap::SetRoot>("setRoot"),
                           InstanceMethod<&KrunContextWrap::AddVirtiofs>("addVirtiofs"),
                           InstanceMethod<&KrunContextWrap::SetPortMap>("setPortMap"),
                           InstanceMethod<&KrunContextWrap::SetExec>("setExec"),
                           InstanceMethod<&KrunContextWrap::SetEnv>("setEnv"),
                           InstanceMethod<&KrunContextWrap::SetWorkdir>("setWorkdir"),
                           InstanceMethod<&KrunContextWrap::SetRlimits>("setRlimits"),
                           InstanceMethod<&KrunContextWrap::SetConsoleOutput>("setConsoleOutput"),
                           InstanceMethod<&KrunContextWrap::AddNet>("addNet"),
                           InstanceMethod<&KrunContextWrap::AddVsockPort>("addVsockPort"),
                           InstanceMethod<&KrunContextWrap::HasFeature>("hasFeature"),
                           InstanceMethod<&KrunContextWrap::Free>("free"),
                       });
  }

  // Only createContext() constructs instances: new KrunContext(External<Adopt>).
  struct Adopt {
    const KrunApi* api;
    uint32_t ctx;
  };

  explicit KrunContextWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<KrunContextWrap>(info) {
    if (info.Length() != 1 || !info[0].IsExternal()) {
      throw Napi::TypeError::New(info.Env(), "KrunContext is created by createContext()");
    }
    Adopt* adopt = info[0].As<Napi::External<Adopt>>().Data();
    api_ = adopt->api;
    ctx_ = adopt->ctx;
    token_ = Register(api_, ctx_);
    env_ = info.Env();
    napi_add_env_cleanup_hook(env_, CleanupHook, reinterpret_cast<void*>(static_cast<uintptr_t>(token_)));
  }

  ~KrunContextWrap() override {
    if (!freed_) {
      KrunFailure ignored;
      Release(token_, &ignored);
      napi_remove_env_cleanup_hook(env_, CleanupHook, reinterpret_cast<void*>(static_cast<uintptr_t>(token_)));
    }
  }

 private:
  void Live(Napi::Env env) const {
    if (freed_) throw CodedError(env, "ERR_MICROVM_CONTEXT_FREED", "this KrunContext was freed");
  }
  void Ok(Napi::Env env, bool ok, const KrunFailure& f) const {
    if (!ok) throw KrunErrorFor(env, f);
  }
  static std::vector<std::string> Strings(const Napi::Value& v) {
    std::vector<std::string> out;
    Napi::Array arr = v.As<Napi::Array>();
    out.reserve(arr.Length());
    for (uint32_t i = 0; i < arr.Length(); i++) {
      out.push_back(arr.Get(i).As<Napi::String>().Utf8Value());
    }
    return out;
  }

  Napi::Value GetId(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), ctx_); }
  Napi::Value GetFreed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), freed_); }
  Napi::Value GetLibkrunPath(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), api_->path); }

  // setLogLevel(level: 0..5)
  void SetLogLevel(const Napi::CallbackInfo& info) {
    Live(info.Env());
    KrunFailure f;
    Ok(info.Env(), KrunSetLogLevel(*api_, info[0].As<Napi::Number>().Uint32Value(), &f), f);
  }
  // setVmConfig(cpus: 1..255, memoryMiB: uint32)
  void SetVmConfig(const Napi::CallbackInfo& info) {
    Live(info.Env());
    KrunFailure f;
    uint8_t cpus = static_cast<uint8_t>(info[0].As<Napi::Number>().Uint32Value());
    uint32_t mem = info[1].As<Napi::Number>().Uint32Value();
    Ok(info.Env(), KrunSetVmConfig(*api_, ctx_, cpus, mem, &f), f);
  }
  // setRoot(path)
  void SetRoot(const Napi::CallbackInfo& info) {
    Live(info.Env());
    KrunFailure f;
    Ok(info.Env(), KrunSetRoot(*api_, ctx_, info[0].As<Napi::String>().Utf8Value(), &f), f);
  }
  // addVirtiofs(tag, path, readOnly)
  void AddVirtiofs(const Napi::CallbackInfo& info) {
    Live(info.Env());
    VirtiofsMount m;
    m.tag = info[0].As<Napi::String>().Utf8Value();
    m.path = info[1].As<Napi::String>().Utf8Value();
    m.read_only = info[2].As<Napi::Boolean>().Value();
    KrunFailure f;
    Ok(info.Env(), KrunAddVirtiofs(*api_, ctx_, m, &f), f);
  }
  // setPortMap("all" | "none" | string[])
  void SetPortMap(const Napi::CallbackInfo& info) {
    Live(info.Env());
    PortMap map;
    if (info[0].IsString()) {
      map.kind = info[0].As<Napi::String>().Utf8Value() == "none" ? PortMapKind::kNone : PortMapKind::kAll;
    } else {
      map.kind = PortMapKind::kList;
      map.entries = Strings(info[0]);
    }
    KrunFailure f;
    Ok(info.Env(), KrunSetPortMap(*api_, ctx_, map, &f), f);
  }
  // setExec(path, args: string[], env: string[] | null)
  void SetExec(const Napi::CallbackInfo& info) {
    Live(info.Env());
    ExecSpec e;
    e.path = info[0].As<Napi::String>().Utf8Value();
    e.args = Strings(info[1]);
    e.has_env = !info[2].IsNull();
    if (e.has_env) e.env = Strings(info[2]);
    KrunFailure f;
    Ok(info.Env(), KrunSetExec(*api_, ctx_, e, &f), f);
  }
  // setEnv(env: string[])
  void SetEnv(const Napi::CallbackInfo& info) {
    Live(info.Env());
    KrunFailure f;
    Ok(info.Env(), KrunSetEnv(*api_, ctx_, Strings(info[0]), &f), f);
  }
  // setWorkdir(path)
  void SetWorkdir(const Napi::CallbackInfo& info) {
    Live(info.Env());
    KrunFailure f;
    Ok(info.Env(), KrunSetWorkdir(*api_, ctx_, info[0].As<Napi::String>().Utf8Value(), &f), f);
  }
  // setRlimits(["RES=CUR:MAX", ...])
  void SetRlimits(const Napi::CallbackInfo& info) {
    Live(info.Env());
    KrunFailure f;
    Ok(info.Env(), KrunSetRlimits(*api_, ctx_, Strings(info[0]), &f), f);
  }
  // setConsoleOutput(path)
  void SetConsoleOutput(const Napi::CallbackInfo& info) {
    Live(info.Env());
    KrunFailure f;
    Ok(info.Env(), KrunSetConsoleOutput(*api_, ctx_, info[0].As<Napi::String>().Utf8Value(), &f), f);
  }
  // addNet(kind: "unixstream"|"unixgram", path: string|null, fd: int (-1), mac: number[6],
  //        features: uint32, flags: uint32)
  void AddNet(const Napi::CallbackInfo& info) {
    Live(info.Env());
    NetDevice n;
    n.kind = info[0].As<Napi::String>().Utf8Value() == "unixgram" ? NetKind::kUnixGram : NetKind::kUnixStream;
    if (!info[1].IsNull()) n.path = info[1].As<Napi::String>().Utf8Value();
    n.fd = info[2].As<Napi::Number>().Int32Value();
    Napi::Array mac = info[3].As<Napi::Array>();
    for (uint32_t i = 0; i < 6; i++) {
      n.mac[i] = static_cast<uint8_t>(mac.Get(i).As<Napi::Number>().Uint32Value());
    }
    n.features = info[4].As<Napi::Number>().Uint32Value();
    n.flags = info[5].As<Napi::Number>().Uint32Value();
    KrunFailure f;
    Ok(info.Env(), KrunAddNet(*api_, ctx_, n, &f), f);
  }
  // addVsockPort(port, path, listen: boolean | undefined)
  void AddVsockPort(const Napi::CallbackInfo& info) {
    Live(info.Env());
    VsockPort p;
    p.port = info[0].As<Napi::Number>().Uint32Value();
    p.path = info[1].As<Napi::String>().Utf8Value();
    p.has_listen = info[2].IsBoolean();
    if (p.has_listen) p.listen = info[2].As<Napi::Boolean>().Value();
    KrunFailure f;
    Ok(info.Env(), KrunAddVsockPort(*api_, ctx_, p, &f), f);
  }
  // hasFeature(feature: number) -> boolean
  Napi::Value HasFeature(const Napi::CallbackInfo& info) {
    KrunFailure f;
    bool present = false;
    uint64_t feature = static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value());
    Ok(info.Env(), KrunHasFeature(*api_, feature, &present, &f), f);
    return Napi::Boolean::New(info.Env(), present);
  }
  // free(): idempotent.
  void Free(const Napi::CallbackInfo& info) {
    if (freed_) return;
    freed_ = true;
    napi_remove_env_cleanup_hook(env_, CleanupHook, reinterpret_cast<void*>(static_cast<uintptr_t>(token_)));
    KrunFailure f;
    Ok(info.Env(), Release(token_, &f), f);
  }

  const KrunApi* api_ = nullptr;
  uint32_t ctx_ = 0;
  uint64_t token_ = 0;
  bool freed_ = false;
  napi_env env_ = nullptr;
};

// ---- async work ------------------------------------------------------------------------------
// A worker that runs Execute() off the JS thread and then settles a promise with whatever
// Settle() builds (it may throw a Napi::Error to reject).

class PromiseWorker : public Napi::AsyncWorker {
 public:
  explicit PromiseWorker(Napi::Env env)
      : Napi::AsyncWorker(env, "node-microvm"), deferred_(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  virtual Napi::Value Settle(Napi::Env env) = 0;

 private:
  void OnOK() override {
    Napi::Env env = Env();
    try {
      deferred_.Resolve(Settle(env));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    }
  }
  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

  Napi::Promise::Deferred deferred_;
};

Napi::Object FirmwareObject(Napi::Env env, const FirmwareInfo& fw) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("path", fw.path);
  o.Set("abiVersion", fw.abi_version);
  o.Set("kernelSize", static_cast<double>(fw.kernel_size));
  o.Set("loadAddress", static_cast<double>(fw.load_address));
  o.Set("entryAddress", static_cast<double>(fw.entry_address));
  return o;
}

class ProbeFirmwareWorker : public PromiseWorker {
 public:
  ProbeFirmwareWorker(Napi::Env env, std::string candidate, bool with_kernel)
      : PromiseWorker(env), candidate_(std::move(candidate)), with_kernel_(with_kernel) {}
  void Execute() override { ok_ = ProbeFirmware(candidate_, &info_, with_kernel_ ? &kernel_ : nullptr, &error_); }
  Napi::Value Settle(Napi::Env env) override {
    if (!ok_) throw CodedError(env, "ERR_MICROVM_LIBKRUNFW_LOAD", error_);
    Napi::Object o = FirmwareObject(env, info_);
    if (with_kernel_) o.Set("kernel", Napi::Buffer<uint8_t>::Copy(env, kernel_.data(), kernel_.size()));
    return o;
  }

 private:
  std::string candidate_;
  bool with_kernel_;
  bool ok_ = false;
  FirmwareInfo info_;
  std::vector<uint8_t> kernel_;
  std::string error_;
};

class ProbeLibkrunWorker : public PromiseWorker {
 public:
  ProbeLibkrunWorker(Napi::Env env, std::string path) : PromiseWorker(env), path_(std::move(path)) {}
  void Execute() override {
    api_ = LoadKrunApi(path_, &error_);
    if (api_ == nullptr || api_->has_feature == nullptr) return;
    // KRUN_FEATURE_* numbers 0..11 (see docs/native.md); unknown ones answer -EINVAL.
    for (uint64_t f = 0; f <= 11; f++) {
      if (api_->has_feature(f) == 1) features_.push_back(static_cast<uint32_t>(f));
    }
  }
  Napi::Value Settle(Napi::Env env) override {
    if (api_ == nullptr) throw CodedError(env, "ERR_MICROVM_LIBKRUN_LOAD", error_);
    Napi::Object o = Napi::Object::New(env);
    o.Set("path", api_->resolved);
    o.Set("hasFeatureCall", api_->has_feature != nullptr);
    Napi::Array arr = Napi::Array::New(env, features_.size());
    for (uint32_t i = 0; i < features_.size(); i++) arr.Set(i, features_[i]);
    o.Set("features", arr);
    return o;
  }

 private:
  std::string path_;
  const KrunApi* api_ = nullptr;
  std::vector<uint32_t> features_;
  std::string error_;
};

// Loads firmware (when given) and libkrun, and creates a context. Shared by createContext and
// validatePlan. On failure sets either `code`+`error` or `failure`.
struct Opened {
  const KrunApi* api = nullptr;
  uint32_t ctx = 0;
  bool ok = false;
  const char* code = nullptr;
  std::string error;
  KrunFailure failure;
};

void OpenContext(const std::string& libkrun_path, const std::string& firmware_path, Opened* out) {
  if (!firmware_path.empty() && !PreloadFirmware(firmware_path, &out->error)) {
    out->code = "ERR_MICROVM_LIBKRUNFW_LOAD";
    return;
  }
  out->api = LoadKrunApi(libkrun_path, &out->error);
  if (out->api == nullptr) {
    out->code = "ERR_MICROVM_LIBKRUN_LOAD";
    return;
  }
  out->ok = KrunCreateCtx(*out->api, &out->ctx, &out->failure);
}

Napi::Error OpenedError(Napi::Env env, const Opened& o) {
  if (o.code != nullptr) return CodedError(env, o.code, o.error);
  return KrunErrorFor(env, o.failure);
}

class CreateContextWorker : public PromiseWorker {
 public:
  CreateContextWorker(Napi::Env env, std::string libkrun, std::string firmware)
      : PromiseWorker(env), libkrun_(std::move(libkrun)), firmware_(std::move(firmware)) {}
  void Execute() override { OpenContext(libkrun_, firmware_, &opened_); }
  Napi::Value Settle(Napi::Env env) override {
    if (!opened_.ok) throw OpenedError(env, opened_);
    KrunContextWrap::Adopt adopt{opened_.api, opened_.ctx};
    AddonData* data = env.GetInstanceData<AddonData>();
    // The constructor copies what it needs out of `adopt` before returning.
    return data->context_ctor.New({Napi::External<KrunContextWrap::Adopt>::New(env, &adopt)});
  }

 private:
  std::string libkrun_, firmware_;
  Opened opened_;
};

class ValidatePlanWorker : public PromiseWorker {
 public:
  ValidatePlanWorker(Napi::Env env, LaunchPlan plan) : PromiseWorker(env), plan_(std::move(plan)) {}
  void Execute() override {
    OpenContext(plan_.libkrun_path, plan_.firmware_path, &opened_);
    if (!opened_.ok) return;
    // The log level is the runner's to apply: installing libkrun's logger here would make the
    // next run's level (or a second dry run) abort Node.
    applied_ = ApplyPlan(*opened_.api, opened_.ctx, plan_, &failure_, /*apply_log_level=*/false);
    KrunFailure ignored;
    KrunFreeCtx(*opened_.api, opened_.ctx, &ignored);
  }
  Napi::Value Settle(Napi::Env env) override {
    if (!opened_.ok) throw OpenedError(env, opened_);
    if (!applied_) throw KrunErrorFor(env, failure_);
    return env.Undefined();
  }

 private:
  LaunchPlan plan_;
  Opened opened_;
  bool applied_ = false;
  KrunFailure failure_;
};

// ---- module functions ------------------------------------------------------------------------

std::string StringArg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!info[i].IsString()) throw Napi::TypeError::New(info.Env(), std::string(name) + " must be a string");
  return info[i].As<Napi::String>().Utf8Value();
}

Napi::Value ErrnoNameFn(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), ErrnoName(info[0].As<Napi::Number>().Int32Value()));
}

Napi::Value ProbeFirmwareFn(const Napi::CallbackInfo& info) {
  auto* w = new ProbeFirmwareWorker(info.Env(), StringArg(info, 0, "candidate"), false);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value ReadFirmwareKernelFn(const Napi::CallbackInfo& info) {
  auto* w = new ProbeFirmwareWorker(info.Env(), StringArg(info, 0, "path"), true);
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value ProbeLibkrunFn(const Napi::CallbackInfo& info) {
  auto* w = new ProbeLibkrunWorker(info.Env(), StringArg(info, 0, "path"));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

Napi::Value CreateContextFn(const Napi::CallbackInfo& info) {
  auto* w = new CreateContextWorker(info.Env(), StringArg(info, 0, "libkrunPath"), StringArg(info, 1, "firmwarePath"));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

LaunchPlan ParsePlanArg(const Napi::CallbackInfo& info) {
  LaunchPlan plan;
  std::string error;
  if (!ParsePlanText(StringArg(info, 0, "plan"), &plan, &error)) {
    throw CodedError(info.Env(), "ERR_MICROVM_PLAN_INVALID", error);
  }
  return plan;
}

Napi::Value CheckPlanFn(const Napi::CallbackInfo& info) {
  ParsePlanArg(info);
  return info.Env().Undefined();
}

Napi::Value ValidatePlanFn(const Napi::CallbackInfo& info) {
  auto* w = new ValidatePlanWorker(info.Env(), ParsePlanArg(info));
  Napi::Promise p = w->Promise();
  w->Queue();
  return p;
}

// writeFileBeneath(root: string, components: string[], data: Buffer, mode: number, uid: number,
//                  gid: number, dirAttrs: [mode, uid, gid][])   (uid/gid -1: leave)
Napi::Value WriteFileBeneathFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string root = StringArg(info, 0, "root");
  Napi::Array comps = info[1].As<Napi::Array>();
  std::vector<std::string> components;
  for (uint32_t i = 0; i < comps.Length(); i++) components.push_back(comps.Get(i).As<Napi::String>().Utf8Value());
  Napi::Buffer<uint8_t> data = info[2].As<Napi::Buffer<uint8_t>>();
  auto num = [](const Napi::Value& v) { return static_cast<int64_t>(v.As<Napi::Number>().Int64Value()); };
  mode_t mode = static_cast<mode_t>(num(info[3]));
  uid_t uid = static_cast<uid_t>(num(info[4]));
  gid_t gid = static_cast<gid_t>(num(info[5]));
  std::vector<DirAttrs> dirs;
  Napi::Array attrs = info[6].As<Napi::Array>();
  for (uint32_t i = 0; i < attrs.Length(); i++) {
    Napi::Array a = attrs.Get(i).As<Napi::Array>();
    DirAttrs d;
    d.mode = static_cast<mode_t>(num(a.Get(0u)));
    d.uid = static_cast<uid_t>(num(a.Get(1u)));
    d.gid = static_cast<gid_t>(num(a.Get(2u)));
    dirs.push_back(d);
  }
  std::string failed_at;
  int err = WriteFileBeneath(root, components, data.Data(), data.Length(), mode, uid, gid, dirs, &failed_at);
  if (err != 0) throw PathError(env, "writing beneath " + root + " failed at " + failed_at, err, failed_at);
  return env.Undefined();
}

// summarizeTree(root) -> { entries, bytes }: the entries under root and the bytes of its regular
// files, never following a symlink (a cache entry's integrity summary; see beneath.h).
Napi::Value SummarizeTreeFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string root = StringArg(info, 0, "root");
  TreeTotals totals;
  std::string failed_at;
  int err = SummarizeTree(root, &totals, &failed_at);
  if (err != 0) throw PathError(env, "summarizing " + root + " failed at " + failed_at, err, failed_at);
  Napi::Object o = Napi::Object::New(env);
  o.Set("entries", Napi::Number::New(env, static_cast<double>(totals.entries)));
  o.Set("bytes", Napi::Number::New(env, static_cast<double>(totals.bytes)));
  return o;
}

// markTopDirectory(dir) -> null, or the errno name why the attribute could not be set (best
// effort: see beneath.h).
Napi::Value MarkTopDirectoryFn(const Napi::CallbackInfo& info) {
  int err = MarkTopDirectory(StringArg(info, 0, "dir"));
  if (err == 0) return info.Env().Null();
  return Napi::String::New(info.Env(), ErrnoName(err));
}

// copyTree(src, dst, { reflink: 'auto' | 'always', threads }) -> { promise, cancel() }: the tree
// copied by tree_copy.cc off the JS thread. The promise resolves { dirs, files, links, symlinks,
// bytes, reflinked }, or rejects with a PathError (code ECANCELED after cancel()). What was made
// under dst stays for the caller to remove.
class CopyTreeWorker : public PromiseWorker {
 public:
  CopyTreeWorker(Napi::Env env, std::string src, std::string dst, TreeCopyOptions options,
                 std::shared_ptr<std::atomic<bool>> cancel)
      : PromiseWorker(env), src_(std::move(src)), dst_(std::move(dst)), options_(options), cancel_(std::move(cancel)) {}
  void Execute() override { ok_ = CopyTree(src_, dst_, options_, *cancel_, &result_, &failure_); }
  Napi::Value Settle(Napi::Env env) override {
    if (!ok_) throw PathError(env, "copy " + failure_.what, failure_.err, failure_.path);
    Napi::Object o = Napi::Object::New(env);
    o.Set("dirs", static_cast<double>(result_.dirs));
    o.Set("files", static_cast<double>(result_.files));
    o.Set("links", static_cast<double>(result_.links));
    o.Set("symlinks", static_cast<double>(result_.symlinks));
    o.Set("bytes", static_cast<double>(result_.bytes));
    o.Set("reflinked", static_cast<double>(result_.reflinked));
    return o;
  }

 private:
  std::string src_, dst_;
  TreeCopyOptions options_;
  std::shared_ptr<std::atomic<bool>> cancel_;
  bool ok_ = false;
  TreeCopyResult result_;
  TreeCopyFailure failure_;
};

Napi::Value CopyTreeFn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string src = StringArg(info, 0, "src");
  std::string dst = StringArg(info, 1, "dst");
  if (!info[2].IsObject()) throw Napi::TypeError::New(env, "options must be an object");
  Napi::Object o = info[2].As<Napi::Object>();
  TreeCopyOptions options;
  std::string reflink = o.Get("reflink").As<Napi::String>().Utf8Value();
  if (reflink != "auto" && reflink != "always") throw Napi::RangeError::New(env, "reflink: 'auto' or 'always'");
  options.reflink = reflink == "always" ? ReflinkMode::kAlways : ReflinkMode::kAuto;
  int threads = o.Get("threads").As<Napi::Number>().Int32Value();
  if (threads < 1 || threads > 64) throw Napi::RangeError::New(env, "threads: 1-64");
  options.threads = threads;
  auto cancel = std::make_shared<std::atomic<bool>>(false);
  auto* w = new CopyTreeWorker(env, std::move(src), std::move(dst), options, cancel);
  Napi::Object out = Napi::Object::New(env);
  out.Set("promise", w->Promise());
  out.Set("cancel", Napi::Function::New(env, [cancel](const Napi::CallbackInfo& i) -> Napi::Value {
            cancel->store(true);
            return i.Env().Undefined();
          }));
  w->Queue();
  return out;
}

// The xattr libkrun's virtio-fs reads for an entry's owner and mode ("uid:gid:0mode"), so that a
// tree owned by an unprivileged host user looks as the image says to the guest.
constexpr char kOverrideStatXattr[] = "user.containers.override_stat";

// setOverrideStat(path, value) -> null, or the errno name. `path` itself, never a link it is: an
// O_PATH|O_NOFOLLOW handle pins the entry and the xattr goes through its /proc/self/fd name.
Napi::Value SetOverrideStatFn(const Napi::CallbackInfo& info) {
  std::string path = StringArg(info, 0, "path");
  std::string value = StringArg(info, 1, "value");
  if (value.size() > 63) throw Napi::RangeError::New(info.Env(), "value: at most 63 bytes");
  Fd self(open(path.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
  if (self.get() < 0) return Napi::String::New(info.Env(), ErrnoName(errno));
  struct stat st;
  if (fstat(self.get(), &st) != 0) return Napi::String::New(info.Env(), ErrnoName(errno));
  if (S_ISLNK(st.st_mode)) return Napi::String::New(info.Env(), ErrnoName(ELOOP));
  char proc[64];
  std::snprintf(proc, sizeof proc, "/proc/self/fd/%d", self.get());
  if (setxattr(proc, kOverrideStatXattr, value.data(), value.size(), 0) != 0)
    return Napi::String::New(info.Env(), ErrnoName(errno));
  return info.Env().Null();
}

// getOverrideStat(path) -> the value, or null when the entry has none (or is a link, or gone).
Napi::Value GetOverrideStatFn(const Napi::CallbackInfo& info) {
  std::string path = StringArg(info, 0, "path");
  char value[64];
  ssize_t n = lgetxattr(path.c_str(), kOverrideStatXattr, value, sizeof value);
  if (n < 0) return info.Env().Null();
  return Napi::String::New(info.Env(), value, static_cast<size_t>(n));
}

// zstdAvailable() -> whether libzstd.so.1 could be loaded (LayerExtractor's zstd option).
Napi::Value ZstdAvailableFn(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), Zstd() != nullptr);
}

// ---- layer extraction ----------------------------------------------------------------------

Napi::Error ExtractError(Napi::Env env, const ExtractFailure& f) {
  if (!f.code.empty()) return CodedError(env, f.code.c_str(), f.message);
  return PathError(env, f.message, f.err, f.entry);
}

// new LayerExtractor(root, options): one layer applied under root (see layer_extract.h).
//   write(chunk) -> bytes of input queued (copied: the chunk is free at once); throws the first
//                   failure, so the caller stops feeding
//   end()          no more input
//   wait(low)   -> Promise: at most `low` input bytes queued (or failed: rejects)
//   done()      -> Promise<{ bytes, entries, compressed, uncompressed, warnings }> once everything
//                   is applied (call end() first)
//   close()        stops both threads, drops what is queued; nothing is written after it returns
class LayerExtractorWrap : public Napi::ObjectWrap<LayerExtractorWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "LayerExtractor",
                       {
                           InstanceMethod<&LayerExtractorWrap::Write>("write"),
                           InstanceMethod<&LayerExtractorWrap::End>("end"),
                           InstanceMethod<&LayerExtractorWrap::Wait>("wait"),
                           InstanceMethod<&LayerExtractorWrap::Done>("done"),
                           InstanceMethod<&LayerExtractorWrap::Close>("close"),
                       });
  }

  explicit LayerExtractorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<LayerExtractorWrap>(info) {
    Napi::Object o = info[1].As<Napi::Object>();
    auto num = [&o](const char* k) { return o.Get(k).As<Napi::Number>().DoubleValue(); };
    ExtractOptions opts;
    opts.gzip = o.Get("gzip").As<Napi::Boolean>().Value();
    opts.zstd = o.Get("zstd").As<Napi::Boolean>().Value();
    if (opts.zstd && (opts.gzip || Zstd() == nullptr)) {
      throw CodedError(info.Env(), "ERR_MICROVM_IMAGE_ZSTD",
                       "zstd layers need libzstd.so.1 (zstdAvailable() is false)");
    }
    opts.chown = o.Get("chown").As<Napi::Boolean>().Value();
    opts.override_xattr = o.Get("overrideXattr").As<Napi::Boolean>().Value();
    opts.max_bytes = static_cast<uint64_t>(num("maxBytes"));
    opts.max_entries = static_cast<uint64_t>(num("maxEntries"));
    opts.max_ratio = num("maxRatio");
    opts.bytes_before = static_cast<uint64_t>(num("bytesBefore"));
    opts.entries_before = static_cast<uint64_t>(num("entriesBefore"));
    opts.tee_fd = static_cast<int>(num("teeFd"));
    opts.check_trailer = o.Get("checkTrailer").As<Napi::Boolean>().Value();
    std::string failed_at;
    int err = LayerExtractor::Open(StringArg(info, 0, "root"), opts, &extractor_, &failed_at);
    if (err != 0) throw PathError(info.Env(), "opening the layer root failed at " + failed_at, err, failed_at);
  }

 private:
  void Check(Napi::Env env) {
    if (!extractor_) throw CodedError(env, "ERR_MICROVM_EXTRACTOR_CLOSED", "the layer extractor is closed");
  }
  Napi::Error Stopped(Napi::Env env) {
    ExtractFailure f;
    if (extractor_->Failure(&f)) return ExtractError(env, f);
    return CodedError(env, "ERR_MICROVM_EXTRACTOR_CLOSED", "the layer extractor was closed");
  }

  Napi::Value Write(const Napi::CallbackInfo& info) {
    Check(info.Env());
    Napi::Buffer<char> b = info[0].As<Napi::Buffer<char>>();
    size_t queued = 0;
    if (!extractor_->Write(b.Data(), b.Length(), &queued)) throw Stopped(info.Env());
    return Napi::Number::New(info.Env(), static_cast<double>(queued));
  }

  Napi::Value End(const Napi::CallbackInfo& info) {
    Check(info.Env());
    extractor_->End();
    return info.Env().Undefined();
  }

  // A waiter: the outcome is read where the extractor is certainly alive (a worker thread or
  // Cancel()) and handed to the JS thread by value, through a thread-safe function that exists
  // only while someone waits (an idle extractor keeps no event loop alive).
  struct WaitState {
    Napi::Promise::Deferred deferred;
    bool with_result = false;
    bool failed = false;
    bool cancelled = false;
    ExtractFailure failure;
    ExtractResult result;
  };
  static void Settle(Napi::Env env, WaitState* s) {
    if (s->failed) {
      s->deferred.Reject(ExtractError(env, s->failure).Value());
    } else if (s->cancelled) {
      s->deferred.Reject(CodedError(env, "ERR_MICROVM_EXTRACTOR_CLOSED", "the layer extractor was closed").Value());
    } else if (s->with_result) {
      Napi::Object r = Napi::Object::New(env);
      r.Set("bytes", Napi::Number::New(env, static_cast<double>(s->result.bytes)));
      r.Set("entries", Napi::Number::New(env, static_cast<double>(s->result.entries)));
      r.Set("compressed", Napi::Number::New(env, static_cast<double>(s->result.compressed)));
      r.Set("uncompressed", Napi::Number::New(env, static_cast<double>(s->result.uncompressed)));
      r.Set("teeOk", Napi::Boolean::New(env, s->result.tee_ok));
      Napi::Array w = Napi::Array::New(env, s->result.warnings.size());
      for (size_t i = 0; i < s->result.warnings.size(); i++) w.Set(static_cast<uint32_t>(i), s->result.warnings[i]);
      r.Set("warnings", w);
      s->deferred.Resolve(r);
    } else {
      s->deferred.Resolve(env.Undefined());
    }
    delete s;
  }
  static void Capture(LayerExtractor* x, WaitState* s) {
    s->failed = x->Failure(&s->failure);
    s->cancelled = x->Cancelled();
    if (s->with_result) s->result = x->Result();
  }
  Napi::Value Await(const Napi::CallbackInfo& info, size_t low, bool done) {
    Napi::Env env = info.Env();
    auto* state =
        new WaitState{Napi::Promise::Deferred::New(env), done, false, false, ExtractFailure(), ExtractResult()};
    Napi::Promise promise = state->deferred.Promise();
    if (!extractor_) {
      state->cancelled = true;
      Settle(env, state);
      return promise;
    }
    LayerExtractor* x = extractor_.get();
    auto tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}),
                                              "microvm.LayerExtractor.wait", 0, 1);
    int now = x->Wait(low, done, [tsfn, state, x]() mutable {
      Capture(x, state);
      tsfn.BlockingCall(state, [](Napi::Env env, Napi::Function, WaitState* s) { Settle(env, s); });
      tsfn.Release();
    });
    if (now < 0) {
      tsfn.Release();
      delete state;
      throw CodedError(env, "ERR_MICROVM_EXTRACTOR_BUSY", "the layer extractor already has a waiter");
    }
    if (now == 1) {
      tsfn.Release();
      Capture(x, state);
      Settle(env, state);
    }
    return promise;
  }
  Napi::Value Wait(const Napi::CallbackInfo& info) {
    return Await(info, static_cast<size_t>(info[0].As<Napi::Number>().Int64Value()), false);
  }
  Napi::Value Done(const Napi::CallbackInfo& info) { return Await(info, 0, true); }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (extractor_) extractor_->Cancel();
    return info.Env().Undefined();
  }

  std::unique_ptr<LayerExtractor> extractor_;
};

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  Napi::Function ctor = KrunContextWrap::Define(env);
  data->context_ctor = Napi::Persistent(ctor);
  env.SetInstanceData<AddonData>(data);

  exports.Set("errnoName", Napi::Function::New<ErrnoNameFn>(env, "errnoName"));
  exports.Set("probeFirmware", Napi::Function::New<ProbeFirmwareFn>(env, "probeFirmware"));
  exports.Set("readFirmwareKernel", Napi::Function::New<ReadFirmwareKernelFn>(env, "readFirmwareKernel"));
  exports.Set("probeLibkrun", Napi::Function::New<ProbeLibkrunFn>(env, "probeLibkrun"));
  exports.Set("createContext", Napi::Function::New<CreateContextFn>(env, "createContext"));
  exports.Set("checkPlan", Napi::Function::New<CheckPlanFn>(env, "checkPlan"));
  exports.Set("validatePlan", Napi::Function::New<ValidatePlanFn>(env, "validatePlan"));
  exports.Set("writeFileBeneath", Napi::Function::New<WriteFileBeneathFn>(env, "writeFileBeneath"));
  exports.Set("summarizeTree", Napi::Function::New<SummarizeTreeFn>(env, "summarizeTree"));
  exports.Set("markTopDirectory", Napi::Function::New<MarkTopDirectoryFn>(env, "markTopDirectory"));
  exports.Set("zstdAvailable", Napi::Function::New<ZstdAvailableFn>(env, "zstdAvailable"));
  exports.Set("copyTree", Napi::Function::New<CopyTreeFn>(env, "copyTree"));
  exports.Set("setOverrideStat", Napi::Function::New<SetOverrideStatFn>(env, "setOverrideStat"));
  exports.Set("getOverrideStat", Napi::Function::New<GetOverrideStatFn>(env, "getOverrideStat"));
  exports.Set("LayerExtractor", LayerExtractorWrap::Define(env));
  exports.Set("KrunContext", ctor);
  exports.Set("abiVersion", Napi::Number::New(env, 5));
  return exports;
}

}  // namespace
}  // namespace microvm

static Napi::Object InitMicrovm(Napi::Env env, Napi::Object exports) {
  return microvm::Init(env, exports);
}

NODE_API_MODULE(microvm, InitMicrovm)
