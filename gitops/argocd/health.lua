-- Argo CD health of llmfactory resources (DatasetBuild, FineTune, Benchmark, Quantization).
-- It reads the kstatus conditions the operator writes, so Argo CD and Flux agree:
--   Stalled=True   -> Degraded     (a terminal failure: invalid spec, runtime error, failed gates)
--   Ready=True     -> Healthy      (Succeeded)
--   Job queued     -> Suspended    (created suspended, waiting for Kueue admission)
--   spec.suspend   -> Suspended    (paused by the user: reason Suspended)
--   otherwise      -> Progressing  (Pending, Waiting for a referenced resource, Running)
-- A status older than the spec (observedGeneration behind) is Progressing: the operator has not
-- yet seen what Git just applied.
local hs = { status = "Progressing", message = "Waiting for the llmfactory operator" }
if obj.status == nil then
  return hs
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "The operator has not reconciled generation " .. tostring(generation) .. " yet"
  return hs
end
local conditions = {}
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    conditions[condition.type] = condition
  end
end
local function describe(condition, fallback)
  local text = condition.message
  if text == nil or text == "" then
    text = fallback
  end
  if condition.reason ~= nil and condition.reason ~= "" then
    return condition.reason .. ": " .. text
  end
  return text
end
local stalled, ready, reconciling = conditions["Stalled"], conditions["Ready"], conditions["Reconciling"]
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled, "failed")
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "succeeded")
elseif reconciling ~= nil and reconciling.status == "True" then
  if reconciling.reason == "Queued" or reconciling.reason == "Suspended" then
    hs.status = "Suspended"
  end
  hs.message = describe(reconciling, obj.status.phase or "in progress")
elseif obj.status.phase ~= nil then
  hs.message = obj.status.phase
end
return hs
