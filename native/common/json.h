// A small, strict JSON reader for launch plans. The runner is a plain executable with no Node
// inside, so it cannot use JSON.parse; the addon uses the same reader so that a plan accepted
// in-process is accepted by the runner byte for byte. Limits: 1 MiB of text, nesting depth 32.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace microvm {

class JsonValue {
 public:
  enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::kNull; }
  bool is_bool() const { return type_ == Type::kBool; }
  bool is_number() const { return type_ == Type::kNumber; }
  bool is_string() const { return type_ == Type::kString; }
  bool is_array() const { return type_ == Type::kArray; }
  bool is_object() const { return type_ == Type::kObject; }

  bool bool_value() const { return bool_; }
  double number_value() const { return number_; }
  const std::string& string_value() const { return string_; }
  const std::vector<JsonValue>& array_items() const { return array_; }
  const std::map<std::string, JsonValue>& object_items() const { return object_; }

  // Member lookup on an object; nullptr when absent or when this is not an object.
  const JsonValue* Get(const std::string& key) const;

  // Parses `text`. On failure returns false and sets `error` (with the byte offset).
  static bool Parse(const std::string& text, JsonValue* out, std::string* error);

 private:
  friend class JsonParser;
  Type type_ = Type::kNull;
  bool bool_ = false;
  double number_ = 0;
  std::string string_;
  std::vector<JsonValue> array_;
  std::map<std::string, JsonValue> object_;
};

// Appends `s` to `out` as a quoted JSON string.
void JsonQuote(const std::string& s, std::string* out);

}  // namespace microvm
