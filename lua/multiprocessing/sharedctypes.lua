-- multiprocessing.sharedctypes: Value, Array, RawValue, RawArray.
--
-- The objects and their constructors are C (runtime/value.c):
-- Value(typecode, init, {lock = true|false|lockobj}) or one options table
-- Value{typecode =, value =, lock =}; Array(typecode, size_or_sequence,
-- opts) or Array{typecode =, size = | init =, lock =}.
local core = require "multiprocessing.core"

return {
  Value = core.Value,
  Array = core.Array,
  RawValue = core.RawValue,
  RawArray = core.RawArray,
}
